"""Throughput switches of :class:`~arlow.training.TrainConfig` applied to a model before training:
``compile`` (torch.compile of the repeated blocks) and ``activation_checkpointing``."""

from __future__ import annotations

import torch

__all__ = ["compile_blocks", "enable_activation_checkpointing"]


def compile_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every repeated block of ``model`` in place; returns how many were compiled.

    The blocks are the classes named in ``model._no_split_modules`` (transformers' list of the layers FSDP wraps):
    per-block graphs compile once and are reused by every block, and the host-side planning around them (input
    checks, packing layout, masking) stays eager. ``nn.Module.compile`` keeps parameter names and state-dict keys.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"train.compile compiles the model's repeated blocks, the classes listed in its _no_split_modules; "
            f"{type(model).__name__} lists {sorted(names) or 'none'} and contains none of them. Set "
            "_no_split_modules on the model class, or compile the model yourself and leave train.compile off."
        )
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every block's activations during backward instead of keeping them (transformers'
    ``GradientCheckpointingLayer`` blocks; non-reentrant checkpointing, which works with compile and FSDP)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.activation_checkpointing needs a transformers model with supports_gradient_checkpointing; "
            f"{type(model).__name__} has none"
        )
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
