"""Shims for the supported transformers range (>= 5.17, < 6).

Each shim detects the feature rather than comparing version strings, and says which versions need it. The
rest of the package imports these names from here instead of from transformers.
"""

from __future__ import annotations

import inspect

import torch
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_utils import PreTrainedModel

__all__ = ["CACHE", "ActivationCheckpointingCompat", "UNMARKED", "build_sub_configs", "declare_sub_configs",
           "offsets_in_prompt", "output_cache", "take_cache", "slice_logits_to_keep"]


# transformers >= 5.25 names the key/value cache `cache` (generate passes `cache=`, outputs carry a `cache` field,
# the mask builders take `cache=`); 5.17-5.24 call it `past_key_values` everywhere. Arlow's forwards keep the
# `past_key_values` parameter (what 5.17-5.24 pass) and take `cache` too; outputs and mask calls use the
# installed version's name (the old one still works on 5.25 but warns on every call).
def _cache_name() -> str:
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


CACHE = _cache_name()


def take_cache(past_key_values, kwargs: dict):
    """The cache given as ``past_key_values`` or as ``cache`` (popped from ``kwargs``); both at once is an error."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the key/value cache once: as cache or as past_key_values, not both")
    return past_key_values if cache is None else cache


def output_cache(outputs):
    """The cache field of a transformers model output, under the installed version's name."""
    return getattr(outputs, CACHE, None)


try:  # transformers >= 5.20 exports it; 5.17-5.19 slice inline in every model
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:
    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """``(B, S, D)`` -> the rows whose logits are wanted.

        ``int`` n: the last n positions (0 = all) -> ``(B, n, D)``; 1-D tensor: these positions for every row;
        2-D integer ``(B, n)``: per-row positions -> ``(B, n, D)``; 2-D bool ``(B, S)``: the True rows, flattened
        -> ``(num_true, D)``.
        """
        if isinstance(logits_to_keep, int):
            return hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        if logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                return hidden_states[logits_to_keep]
            return torch.gather(
                hidden_states, 1, logits_to_keep[..., None].expand(-1, -1, hidden_states.shape[-1])
            )
        return hidden_states[:, logits_to_keep, :]


try:  # transformers >= 5.20 marks chat-template control tokens; 5.17-5.19 have no marks to skip
    from transformers.processing_utils import _UNMARKED as UNMARKED
except ImportError:
    UNMARKED = ""


def build_sub_configs(config: PreTrainedConfig) -> None:
    """Turn ``None``/dict sub-configs of ``config`` into instances of ``type(config).sub_configs_defaults``.

    transformers >= 5.20 does this in ``PreTrainedConfig.__post_init__`` (and skips instances); 5.17-5.19 only
    know the ``sub_configs`` class map and leave the conversion to each config. Called before
    ``super().__post_init__`` so both behave alike.
    """
    for key, spec in type(config).sub_configs_defaults.items():
        cls = getattr(spec, "config_class", spec)  # 5.20+ wraps each class in a SubConfigSpec
        value = getattr(config, key)
        if value is None:
            setattr(config, key, cls())
        elif isinstance(value, dict):
            setattr(config, key, cls(**value))


def declare_sub_configs(cls: type) -> type:
    """Class decorator: publish ``sub_configs_defaults`` as the ``sub_configs`` map on transformers 5.17-5.19.

    5.20+ derive ``sub_configs`` from ``sub_configs_defaults`` themselves (a class property); 5.17-5.19 read
    only ``sub_configs`` (attention-implementation propagation, ``to_dict``, loading).
    """
    if "sub_configs_defaults" not in vars(PreTrainedConfig):
        cls.sub_configs = dict(cls.sub_configs_defaults)
    return cls


class ActivationCheckpointingCompat:
    """Mixin for Arlow's ``PreTrainedModel`` classes: ``activation_checkpointing_enable`` on every version.

    transformers 5.17-5.19 name it ``gradient_checkpointing_enable`` only (later versions keep that as a
    deprecated alias); the mixin adds the new name when the base class lacks it and is empty otherwise.
    """

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                                               **kwargs)


def offsets_in_prompt(offset_mapping: list, replacements: list[list[dict]]) -> list:
    """Token character offsets in the expanded text -> offsets in the text before placeholder expansion.

    transformers 5.17-5.18 match ``{% generation %}`` spans (positions in the rendered prompt) against the
    processor's ``offset_mapping`` without asking for ``text_replacement_offsets``; later versions shift the spans
    themselves. A token inside an expanded run maps to its placeholder's span; zero-width tokens stay put.

    Args:
        offset_mapping: per sample, ``(start, end)`` of every token in the expanded text.
        replacements: per sample, the processor's replacement records (``span`` before, ``new_span`` after).
    """
    out = []
    for offsets, spans in zip(offset_mapping, replacements):
        def back(pos: int, is_end: bool, spans=spans) -> int:
            gain = 0
            for r in spans:
                (start, end), (new_start, new_end) = r["span"], r["new_span"]
                if (new_start < pos <= new_end) if is_end else (new_start <= pos < new_end):
                    return end if is_end else start
                if new_end <= pos:
                    gain += (new_end - new_start) - (end - start)
            return pos - gain
        out.append([(s, e) if s == e else (back(s, False), back(e, True)) for s, e in offsets])
    return out
