"""The Arlow vision-language model: vision tokens take the place of placeholder tokens in the text.

Read top to bottom: outputs -> small pure helpers -> ``ArlowModel`` (encode media, place the tokens, DeepStack inputs,
3-D positions, run the decoder) -> ``ArlowForConditionalGeneration`` (``lm_head``, loss, ``generate`` plumbing).

The contract with :class:`~arlow.processing.ArlowProcessor` (design D2/D3): every image (video) of ``t x h x w``
patches becomes one *run* of ``t*h*w / s**2`` consecutive ``<image>`` (``<video>``) tokens, runs in the same order as
the rows of ``image_grid_thw`` (``video_grid_thw``) across the whole batch. The model replaces run ``i`` by the
``t*h*w / s**2`` merged tokens the encoder produced for item ``i`` -- every token of every item, nothing pooled.

Shapes: ``B`` batch, ``S`` new tokens, ``Hd`` hidden size (vision output width == text width), ``N`` patch rows of
all items together, ``s`` spatial merge size.

Weight names follow the reference fork: ``model.visual.*`` (an :class:`ArlowVLVisionModel`),
``model.language_model.*`` (an :class:`ArlowTextModel`), ``lm_head.weight``. Its defects are not reproduced:
one token per placeholder instead of one pooled vector per image, M-RoPE blocks that match the runs, DeepStack level
``k`` after text layer ``config.deepstack_text_layers[k]`` (never dropped), and loading never re-initialises weights
silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .._compat import CACHE, output_cache, slice_logits_to_keep, take_cache
from ..configuration import ArlowConfig
from .kernels.linear import Linear
from .rope import get_rope_index, mrope_slot_axes
from .text import ArlowTextModel, decoder_forward_flops
from .vision import ArlowPreTrainedModel, ArlowVLVisionModel, vision_forward_flops

__all__ = [
    "ArlowVisualFeatures",
    "ArlowModelOutputWithPast",
    "ArlowCausalLMOutputWithPast",
    "ArlowModel",
    "ArlowForConditionalGeneration",
    "vlm_forward_flops",
]

# Keys of a processor output that describe media, per modality: (pixels, grid, extra per-item values).
_MEDIA_KEYS = {
    "image": ("pixel_values", "image_grid_thw", None),
    "video": ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"),
}


@dataclass
class ArlowVisualFeatures(BaseModelOutputWithPooling):
    """Encoder output for a set of images (or videos), split per item (transformers 5.x ``get_image_features``
    contract, as Qwen2-VL / Qwen3-VL: callers such as vLLM's Transformers backend read ``pooler_output``).

    Args:
        last_hidden_state: ``(N, embed_dim)`` the encoder's last block output before the merger, one row per patch.
        pooler_output: one ``(t_i*h_i*w_i / s**2, Hd)`` tensor per item: the merged tokens that replace the item's
            placeholders, every token of the item, nothing pooled.
        deepstack_features: one ``(n_tokens, Hd)`` tensor per DeepStack level, rows aligned with
            the merged tokens of all items (``torch.cat(pooler_output)``).
        hidden_states: with ``output_hidden_states=True``, the encoder's un-merged states (see
            :class:`~arlow.modeling.vision.ArlowVisionModelOutput`).
    """

    pooler_output: tuple[torch.Tensor, ...] | None = None
    deepstack_features: tuple[torch.Tensor, ...] | None = None


class _EncoderOutputs:
    """``image_outputs`` / ``video_outputs``: the :class:`ArlowVisualFeatures` of the media encoded by this call
    (``None`` where none were given), as transformers' multimodal outputs (5.25+) carry them. In a tuple
    (``return_dict=False``) they appear as their own tuples."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k).to_tuple() if k in ("image_outputs", "video_outputs") else self[k]
                     for k in self.keys())


@dataclass
class ArlowModelOutputWithPast(_EncoderOutputs, BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``rope_deltas (B, 1)`` (M-RoPE position minus sequence index for new
    tokens) and the encoders' ``image_outputs`` / ``video_outputs``."""

    rope_deltas: torch.Tensor | None = None
    image_outputs: ArlowVisualFeatures | None = None
    video_outputs: ArlowVisualFeatures | None = None


@dataclass
class ArlowCausalLMOutputWithPast(_EncoderOutputs, CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``rope_deltas (B, 1)``, ``image_outputs`` and ``video_outputs``."""

    rope_deltas: torch.Tensor | None = None
    image_outputs: ArlowVisualFeatures | None = None
    video_outputs: ArlowVisualFeatures | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers


def run_lengths(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of ``True`` in a ``(B, S)`` mask, in row-major order (a run never spans two rows)."""
    padded = F.pad(mask.to(torch.int8), (1, 1)).flatten()  # a zero on both sides of every row
    edges = padded.diff()
    starts = (edges == 1).nonzero().flatten()
    ends = (edges == -1).nonzero().flatten()
    return (ends - starts).tolist()


def text_positions(attention_mask: torch.Tensor | None, batch: int, seq: int, past: int,
                   device: torch.device) -> torch.Tensor:
    """``(B, S)`` 1-D positions of the last ``S`` tokens: ``cumsum(mask) - 1`` (padding -> 0) or ``past + arange``."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and attention_mask.shape[-1] >= seq:
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 0)[:, -seq:]
        return pos.to(device)
    return torch.arange(past, past + seq, device=device).unsqueeze(0).expand(batch, seq)


def _repeat_media(mask: torch.Tensor, present: dict, keys: tuple, expand_size: int) -> dict:
    """Repeat the items of each sample ``expand_size`` times, keeping samples in order.

    ``mask (B, S)`` marks the sample's placeholders (one run per item); ``present`` holds the packed pixels
    ``(N, ...)`` and the per-item values (grid ``(n, 3)``, ``second_per_grid_ts (n,)``) of one modality.
    """
    pixels_name, grid_name, _ = keys
    if grid_name not in present:
        raise ValueError(f"expanding {pixels_name} for beam search / num_return_sequences needs {grid_name}")
    starts = mask & ~F.pad(mask[:, :-1], (1, 0), value=False)
    per_sample = starts.sum(-1).tolist()  # items (runs) per sample
    rows_per_item = present[grid_name].prod(-1).tolist()
    item_bounds, rows_bounds = [0], [0]
    for count in per_sample:
        item_bounds.append(item_bounds[-1] + count)
        rows_bounds.append(rows_bounds[-1] + sum(rows_per_item[item_bounds[-2]:item_bounds[-1]]))
    out = {}
    for name, value in present.items():
        bounds = rows_bounds if name == pixels_name else item_bounds
        chunks = [value[bounds[i]:bounds[i + 1]] for i in range(len(per_sample))]
        out[name] = torch.cat([chunk for chunk in chunks for _ in range(expand_size)])
    return out


def _check_text_only_dir(path, config) -> None:
    """A text-only ``ArlowForCausalLM`` folder must not be loaded into the VLM (every weight would be re-initialised,
    the reference fork's silent failure)."""
    if config is not None or not isinstance(path, (str, Path)):
        return
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type in ("arlow_text", "arlow_vision"):
            raise ValueError(
                f"{path} holds a {model_type!r} checkpoint, not an Arlow vision-language model. Build one with "
                "`arlow create-model OUT --vision-encoder VISION_DIR --text-model TEXT_DIR` (arlow.assemble), or load "
                "a text model with AutoModelForCausalLM / a vision encoder with AutoModel."
            )


# ----------------------------------------------------------------------------------------------------------------
# Models


class ArlowModel(ArlowPreTrainedModel):
    """Vision encoder + text decoder: ``input_ids (B, S)`` with placeholder runs and media -> ``(B, S, Hd)`` states.

    Children: ``visual`` (:class:`ArlowVLVisionModel` built from ``config.vision_config``) and ``language_model``
    (:class:`ArlowTextModel` built from ``config.text_config``); both get the very sub-config objects of ``config``,
    so ``attn_implementation={"vision_config": ..., "text_config": ...}`` reaches each tower.
    """

    config_class = ArlowConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    accepts_loss_kwargs = False
    _no_split_modules = ["ArlowVLBlock", "ArlowDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # Decode steps trace without graph breaks and transformers' kwargs reach the decoder's attention interface
    # (the vision tower runs at prefill only): tests/conformance proves both.
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def __init__(self, config: ArlowConfig):
        super().__init__(config)
        self.visual = ArlowVLVisionModel._from_config(config.vision_config)
        self.language_model = ArlowTextModel._from_config(config.text_config)
        # The decoder's M-RoPE slot table is a plain tensor attribute, so under from_pretrained's meta-device build
        # it stays an empty meta tensor that nothing restores; the 3-D positions of this model would then fail.
        # Build it on the CPU whatever the ambient device (the rotary module moves it to the input's device).
        with torch.device("cpu"):
            self.language_model.rotary_emb._slot_axes = mrope_slot_axes(config.text_config.mrope_sections)
        self.rope_deltas: torch.Tensor | None = None  # (B, 1), set by each prefill, read by decode steps
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        _check_text_only_dir(pretrained_model_name_or_path, kwargs.get("config"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    # -- media -> tokens -------------------------------------------------------------------------------------------

    def _encode(self, pixel_values: torch.Tensor, grid_thw, kind: str, output_hidden_states=None,
                **kwargs) -> ArlowVisualFeatures:
        pixels_name, grid_name, _ = _MEDIA_KEYS[kind]
        if grid_thw is None:
            raise ValueError(f"{pixels_name} was given without {grid_name}: pass the (n_{kind}s, 3) grid that the "
                             "processor returned together with these pixels")
        grid = torch.as_tensor(grid_thw)
        if grid.ndim != 2 or grid.shape[-1] != 3:
            raise ValueError(f"{grid_name} must have shape (n_{kind}s, 3) (t, h, w in patches), got "
                             f"{tuple(grid.shape)}")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 2:
            rows = int(grid.prod(-1).sum())
            if rows != pixel_values.shape[0]:
                raise ValueError(
                    f"{grid_name} {grid.tolist()} describes {rows} patch rows (sum of t*h*w) but {pixels_name} has "
                    f"{pixel_values.shape[0]} rows; pass the grid that came with these pixels"
                )
        if isinstance(pixel_values, torch.Tensor) and not torch.isfinite(pixel_values).all():
            raise ValueError(f"{pixels_name} hold NaN or inf values: the {kind} data is broken (check the arrays or "
                             "tensors given to the processor, or your own preprocessing)")
        # checks the remaining shapes with its own messages
        if output_hidden_states is None:
            output_hidden_states = self.config.vision_config.output_hidden_states
        out = self.visual(pixel_values, grid_thw=grid, output_hidden_states=bool(output_hidden_states))
        sizes = (grid.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        return ArlowVisualFeatures(
            last_hidden_state=out.unmerged_state,
            pooler_output=tuple(torch.split(out.last_hidden_state, sizes)),
            deepstack_features=tuple(out.deepstack_features),
            hidden_states=out.hidden_states,
        )

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                           **kwargs) -> ArlowVisualFeatures | tuple:
        """Encode images: ``pixel_values (N, C*Tp*P*P)`` + ``image_grid_thw (n, 3)`` -> per-image merged tokens
        in ``pooler_output`` (``t*h*w / s**2`` each, not pooled), the encoder's un-merged output in
        ``last_hidden_state`` and the DeepStack levels. ``return_dict=False`` gives a tuple;
        ``output_hidden_states=True`` adds the encoder's states; other transformers keyword arguments are accepted
        and unused."""
        return self._encode(pixel_values, image_grid_thw, "image", **kwargs)

    @can_return_tuple
    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                           **kwargs) -> ArlowVisualFeatures | tuple:
        """Encode videos: ``pixel_values_videos (N, C*Tp*P*P)`` + ``video_grid_thw (n, 3)`` -> per-video tokens,
        as :meth:`get_image_features`."""
        return self._encode(pixel_values_videos, video_grid_thw, "video", **kwargs)

    def get_placeholder_mask(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        image_features: ArlowVisualFeatures | torch.Tensor | None = None,
        video_features: ArlowVisualFeatures | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_mask, video_mask)``, each ``(B, S)`` bool, True at placeholder tokens.

        Without ``input_ids`` the placeholders are found by comparing ``inputs_embeds`` with the placeholder
        embeddings. For every modality whose features are given, the number of placeholder tokens must equal the
        number of visual tokens and each run must match its item; otherwise ``ValueError`` with both counts.
        """
        cfg = self.config
        masks = {}
        for kind, token_id in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
            if input_ids is not None:
                masks[kind] = input_ids == token_id
            else:
                ref = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
                masks[kind] = (inputs_embeds == ref.to(inputs_embeds.dtype)).all(-1)
        problems = []
        for kind, feats in (("image", image_features), ("video", video_features)):
            if feats is None:
                continue
            items = feats.pooler_output if isinstance(feats, ArlowVisualFeatures) else (feats,)
            sizes = [len(item) for item in items]
            found = int(masks[kind].sum())
            token = f"<{kind}> (id {getattr(cfg, f'{kind}_token_id')})"
            if found != sum(sizes):
                problems.append(
                    f"found {found} {kind} placeholder tokens {token} in the input but the {kind}s give "
                    f"{sum(sizes)} visual tokens ({len(sizes)} {kind}(s) of {sizes} tokens)"
                )
            elif isinstance(feats, ArlowVisualFeatures):
                runs = run_lengths(masks[kind])
                if runs != sizes:
                    problems.append(f"the {kind} placeholder runs have lengths {runs} but the {kind}s give {sizes} "
                                    f"tokens each, in order")
        if problems:
            raise ValueError(
                "; ".join(problems) + ". Each image/video must be one run of t*h*w/" +
                f"{self.config.vision_config.spatial_merge_size ** 2} placeholders: build the inputs with "
                "ArlowProcessor (and do not truncate them)."
            )
        return masks["image"], masks["video"]

    def _deepstack_inputs(self, image_mask, video_mask, image_feats, video_feats):
        """``visual_pos_masks (B, S)`` and ``{text_layer: (n_visual, Hd)}`` for the decoder, or ``(None, None)``.

        Images and videos share one mask; level ``k`` rows are ordered like the visual positions (row-major), and
        levels mapped to the same text layer are summed.
        """
        layers = self.config.deepstack_text_layers
        present = [(m, f) for m, f in ((image_mask, image_feats), (video_mask, video_feats)) if f is not None]
        if not layers or not present:
            return None, None
        if len(present) == 1:
            visual = present[0][0]
            levels = list(present[0][1].deepstack_features)
        else:
            visual = image_mask | video_mask
            image_rows, video_rows = image_mask[visual], video_mask[visual]
            levels = []
            for img, vid in zip(image_feats.deepstack_features, video_feats.deepstack_features):
                joint = img.new_zeros(int(visual.sum()), img.shape[-1])
                joint[image_rows] = img.to(joint.dtype)
                joint[video_rows] = vid.to(joint.dtype)
                levels.append(joint)
        plan: dict[int, torch.Tensor] = {}
        for layer, feats in zip(layers, levels):
            plan[layer] = plan[layer] + feats if layer in plan else feats
        return visual, plan

    # -- positions -------------------------------------------------------------------------------------------------

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                       second_per_grid_ts=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(position_ids (3, B, S), rope_deltas (B, 1))`` from :func:`arlow.modeling.rope.get_rope_index` with this
        model's token ids, merge size and ``config.tokens_per_second``. Placeholder ids of a modality without grids
        are text positions. Other keyword arguments (transformers passes ``mm_token_type_ids``) are ignored:
        placeholders are found from ``input_ids``."""
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
        if image_grid_thw is None and video_grid_thw is None:
            # Text only: the same numbers as the general routine (padding at 1), without its per-token loop.
            real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
            text = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
            deltas = real.sum(-1, keepdim=True) - input_ids.shape[1]
            return text.unsqueeze(0).expand(3, -1, -1).contiguous(), deltas
        return get_rope_index(
            input_ids, image_grid_thw, video_grid_thw, mask,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
            second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=self.config.tokens_per_second,
        )

    def placeholder_ids(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Stand-in ``(B, S)`` ids for a prompt given as embeddings: the image / video placeholder id where a row
        equals that placeholder's embedding, -1 elsewhere. :meth:`get_rope_index` reads nothing else, so the
        media of such a prompt get the same M-RoPE positions as from its ids."""
        image, video = self.get_placeholder_mask(None, inputs_embeds)
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        return ids.masked_fill(image, self.config.image_token_id).masked_fill(video, self.config.video_token_id)

    def compute_position_ids(self, input_ids, inputs_embeds, attention_mask, past_key_values, image_grid_thw,
                             video_grid_thw, second_per_grid_ts) -> torch.Tensor:
        """``(3, B, S)`` M-RoPE positions when the caller gave none.

        A prefill (empty cache) runs :meth:`get_rope_index` and caches ``rope_deltas``; later steps place new token
        ``i`` of the full sequence at ``i + rope_deltas``, which already accounts for left padding and media.
        """
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past == 0:
            ids = input_ids if input_ids is not None else self.placeholder_ids(inputs_embeds)
            positions, deltas = self.get_rope_index(ids, image_grid_thw, video_grid_thw, attention_mask,
                                                    second_per_grid_ts)
            self.rope_deltas = deltas
            return positions.to(device)
        deltas = self.rope_deltas
        if deltas is None or batch % deltas.shape[0]:
            # No prefill went through this model (a cache built elsewhere): text-only positions from the mask.
            return text_positions(attention_mask, batch, seq, past, device).unsqueeze(0).expand(3, -1, -1)
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        positions = torch.arange(past, past + seq, device=device).unsqueeze(0) + deltas
        return positions.unsqueeze(0).expand(3, -1, -1)

    # -- forward ---------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> ArlowModelOutputWithPast:
        r"""
        Args:
            input_ids: ``(B, S)`` with one run of ``<image>``/``<video>`` placeholders per item (as the processor
                writes them); or ``inputs_embeds (B, S, Hd)``.
            attention_mask: ``(B, K)`` padding mask over cache + new tokens (left padding for batched generation).
            position_ids: ``(3, B, S)`` (t, h, w) or ``(4, B, S)`` ([text, t, h, w], what ``generate`` passes); computed
                with :meth:`get_rope_index` when omitted.
            pixel_values, image_grid_thw: ``(N, C*Tp*P*P)`` patch rows of all images and their ``(n_images, 3)``
                grids. ``pixel_values_videos``, ``video_grid_thw`` likewise for videos.
            second_per_grid_ts: ``(n_videos,)`` seconds per temporal patch; with ``config.tokens_per_second`` video
                temporal positions follow real time.
            mm_token_type_ids: accepted for compatibility with transformers' processors and ignored: placeholders are
                found from ``input_ids``.
        Returns:
            :class:`ArlowModelOutputWithPast` with ``last_hidden_state (B, S, Hd)``, ``rope_deltas (B, 1)`` and,
            for the media given, ``image_outputs`` / ``video_outputs`` (:class:`ArlowVisualFeatures`; with
            ``output_hidden_states=True`` they hold the encoder's hidden states too).
        """
        past_key_values = take_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, S) or inputs_embeds (B, S, hidden)")
        if inputs_embeds is None:
            _check_token_ids(input_ids, self.get_input_embeddings().num_embeddings)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0

        image_feats = video_feats = None
        encoder_states = kwargs.get("output_hidden_states")  # the encoders' states too, as upstream
        if pixel_values is not None:
            image_feats = self.get_image_features(pixel_values, image_grid_thw, output_hidden_states=encoder_states)
        if pixel_values_videos is not None:
            video_feats = self.get_video_features(pixel_values_videos, video_grid_thw,
                                                  output_hidden_states=encoder_states)
        image_mask = video_mask = None
        # As upstream: the placeholders are checked against the media where media are given; without media a
        # placeholder id is just a token (assisted decoding, a generated placeholder id, embeddings of random ids).
        if image_feats is not None or video_feats is not None:
            image_mask, video_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_feats, video_feats)
        for mask, feats in ((image_mask, image_feats), (video_mask, video_feats)):
            if feats is not None:
                rows = torch.cat(feats.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), rows)
        visual_pos_masks, deepstack = self._deepstack_inputs(image_mask, video_mask, image_feats, video_feats)

        if position_ids is None:
            position_ids = self.compute_position_ids(input_ids, inputs_embeds, attention_mask, past_key_values,
                                                     image_grid_thw, video_grid_thw, second_per_grid_ts)
        outputs = self.language_model(
            input_ids=None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            visual_pos_masks=visual_pos_masks,
            deepstack_visual_embeds=deepstack,
            **kwargs,
        )
        return ArlowModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=self.rope_deltas,
            image_outputs=image_feats,
            video_outputs=video_feats,
        )


class ArlowForConditionalGeneration(ArlowPreTrainedModel, GenerationMixin):
    """:class:`ArlowModel` + ``lm_head``: ``logits (B, S', vocab)`` (``S'`` set by ``logits_to_keep``), loss, and
    ``generate()`` over images, videos, text and mixed, left-padded batches."""

    config_class = ArlowConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    accepts_loss_kwargs = False
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _no_split_modules = ["ArlowVLBlock", "ArlowDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # Decode steps trace without graph breaks and transformers' kwargs reach the decoder's attention interface
    # (the vision tower runs at prefill only): tests/conformance proves both.
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def __init__(self, config: ArlowConfig):
        super().__init__(config)
        self.model = ArlowModel(config)
        self.lm_head = Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        _check_text_only_dir(pretrained_model_name_or_path, kwargs.get("config"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.lm_head:
            init.normal_(module.weight, mean=0.0, std=self.config.text_config.initializer_range)
        else:
            super()._init_weights(module)

    @property
    def visual(self) -> ArlowVLVisionModel:
        return self.model.visual

    @property
    def language_model(self) -> ArlowTextModel:
        return self.model.language_model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs) -> ArlowVisualFeatures | tuple:
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs) -> ArlowVisualFeatures | tuple:
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    def _mask_visual_labels(self, labels: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """Placeholder positions are inputs, never targets: their labels become -100 whatever the caller wrote."""
        if input_ids is None:
            return labels
        visual = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        return labels.masked_fill(visual.to(labels.device), -100)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> ArlowCausalLMOutputWithPast:
        r"""Arguments as :meth:`ArlowModel.forward`, plus:

        Args:
            labels: ``(B, S)`` unshifted targets, -100 = ignored; placeholder positions are always ignored. The loss
                is the mean next-token cross-entropy over the remaining targets, in fp32.
            logits_to_keep: compute logits for the last ``n`` positions only (``0`` = all), or for given indices.
        """
        past_key_values = take_cache(past_key_values, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            use_cache=use_cache,
            output_last=logits_to_keep if labels is None else None,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            labels = self._mask_visual_labels(labels, input_ids)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return ArlowCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=outputs.rope_deltas,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
        )

    # -- generate() plumbing ---------------------------------------------------------------------------------------

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs) -> torch.Tensor:
        """``(4, B, L)`` = [text; t; h; w] positions of the prompt; ``generate`` then adds 1 per step to every row.

        Row 0 (``cumsum(mask) - 1``) drives the attention masks, rows 1-3 (``get_rope_index``, which honours the
        padding mask) the rotary embedding. ``rope_deltas`` are cached on ``self.model`` like a direct prefill does.
        """
        ids = model_kwargs.get("input_ids")
        if ids is None or ids.shape[-1] == 0:  # transformers >= 5.25 passes an empty (B, 0) one with embeddings
            ids = inputs_tensor
        if ids is not None and (ids.numel() == 0 or not ids.is_floating_point()):  # an empty prompt is float
            _check_token_ids(ids, self.get_input_embeddings().num_embeddings)
        batch, seq = ids.shape[:2]
        mask = model_kwargs.get("attention_mask")
        text = text_positions(mask, batch, seq, 0, ids.device)
        if ids.is_floating_point():  # prompt given as embeddings: find its placeholders by their embedding
            ids = self.model.placeholder_ids(ids)
        mrope, deltas = self.model.get_rope_index(
            ids, model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw"), mask,
            model_kwargs.get("second_per_grid_ts"),
        )
        self.model.rope_deltas = deltas
        return torch.cat([text.unsqueeze(0), mrope.to(text.device)], dim=0)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Beam search / ``num_return_sequences``: repeat each sample's media with the sample.

        The generic version repeats every tensor along dim 0, which for packed ``pixel_values (N, ...)`` would repeat
        patch rows instead of samples.
        """
        if expand_size == 1:
            return input_ids, model_kwargs
        ids = input_ids if input_ids is not None and input_ids.shape[-1] > 0 else model_kwargs.get("input_ids")
        media = {}
        for kind, keys in _MEDIA_KEYS.items():
            present = {k: model_kwargs.pop(k) for k in keys if k is not None and model_kwargs.get(k) is not None}
            if present:
                media[kind] = present
        # Multi-axis positions (4, B, S) repeat along dim 1 (transformers 5.17-5.18 would repeat dim 0).
        positions = model_kwargs.pop("position_ids", None)
        if media:
            masks = dict(zip(("image", "video"), self._placeholder_masks(ids, model_kwargs.get("inputs_embeds"))))
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if positions is not None:
            model_kwargs["position_ids"] = positions.repeat_interleave(expand_size, dim=positions.ndim - 2)
        for kind, present in media.items():
            model_kwargs.update(_repeat_media(masks[kind], present, _MEDIA_KEYS[kind], expand_size))
        return input_ids, model_kwargs

    def _placeholder_masks(self, input_ids, inputs_embeds) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_mask, video_mask)`` of the prompt, from its ids or (a prompt given as embeddings) its rows."""
        if input_ids is not None and input_ids.shape[-1] > 0:
            return self.model.get_placeholder_mask(input_ids, None)
        if inputs_embeds is None:
            raise ValueError("expanding media for beam search / num_return_sequences needs input_ids or inputs_embeds")
        return self.model.get_placeholder_mask(None, inputs_embeds)


def vlm_forward_flops(config: ArlowConfig, text_tokens: int, vision_lengths: list[int]) -> float:
    """Model FLOPs of one forward: the decoder over ``text_tokens`` (:func:`~arlow.modeling.text.decoder_forward_flops`)
    plus the vision encoder over items of ``vision_lengths`` patch rows
    (:func:`~arlow.modeling.vision.vision_forward_flops`; nothing for a text-only batch)."""
    flops = decoder_forward_flops(config.text_config, text_tokens)
    if vision_lengths:
        flops += vision_forward_flops(config.vision_config, vision_lengths)
    return flops


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse an empty ``input_ids (B, S)`` and ids outside ``[0, vocab_size)`` with a message, not an IndexError.

    Not under ``torch.compile``: the range check reads tensor values, a graph break (a compiled decode step gets the
    ids generate itself produced)."""
    if torch.compiler.is_compiling():
        return
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt with at least "
                         "one token (an empty prompt string tokenizes to nothing)")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab_size}): were they made "
                         "by another tokenizer? Use this model's processor or tokenizer")
