"""AdamW parameter groups (no weight decay on 1-D parameters, per-group learning rates) and the lr schedule."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


class WarmupCosine:
    """Learning-rate multiplier for optimizer step ``s`` (0-based): linear warmup, then half-cycle cosine.

    ``s < warmup_steps``: ``(s + 1) / warmup_steps`` (the first step already trains, the last warmup step is at peak);
    afterwards ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)``, so the first step after warmup is at peak and the
    multiplier approaches ``min_lr_ratio`` at ``total_steps``. A class (not a closure) so that
    ``LambdaLR.state_dict()`` records the schedule's numbers in checkpoints.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        if not 0 <= warmup_steps <= total_steps or total_steps < 1:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps}, {total_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-D (or scalar) parameters are not decayed (MAE / timm convention)."""
    return param.ndim <= 1


def build_param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    param_groups: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into AdamW groups.

    ``param_groups=None`` means one group of every trainable parameter at ``learning_rate``. Otherwise each given
    group is ``{"params": [...], "lr": optional, "weight_decay": optional, ...}`` (missing values fall back to
    ``learning_rate`` / ``weight_decay``; extra keys are kept). Every group is split in two: its >=2-D parameters
    keep the group's weight decay, its 1-D parameters get 0. Empty halves are dropped. Each returned group carries
    ``"initial_lr"`` (its peak lr, which the schedule multiplies) and ``"name"``.

    Raises ValueError when a parameter is listed twice, is frozen, or is trainable but in no group (it would
    silently never train: freeze it with ``requires_grad_(False)`` or add it to a group).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if param_groups is None:
        param_groups = [{"params": trainable}]
    if not isinstance(param_groups, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in param_groups):
        raise ValueError('param_groups must be a list of dicts like {"params": [...], "lr": 1e-4, "weight_decay": 0.05}')

    seen: set[int] = set()
    groups: list[dict[str, Any]] = []
    for index, group in enumerate(param_groups):
        params = list(_as_params(group["params"]))
        for p in params:
            label = names.get(id(p), f"<a tensor of shape {tuple(p.shape)}>")
            if id(p) not in names:
                raise ValueError(f"param group {index} holds {label}, which is not a parameter of the model")
            if not p.requires_grad:
                raise ValueError(f"param group {index} holds {label}, which is frozen (requires_grad=False)")
            if id(p) in seen:
                raise ValueError(f"parameter {label} appears in more than one param group")
            seen.add(id(p))
        lr = float(group.get("lr", learning_rate))
        wd = float(group.get("weight_decay", weight_decay))
        if lr < 0 or wd < 0:
            raise ValueError(f"param group {index}: lr and weight_decay must be >= 0, got lr={lr}, weight_decay={wd}")
        extra = {k: v for k, v in group.items() if k not in ("params", "lr", "weight_decay", "initial_lr")}
        base = extra.pop("name", f"group{index}")
        decay = [p for p in params if not no_weight_decay(p)]
        keep = [p for p in params if no_weight_decay(p)]
        for suffix, members, decay_value in (("decay", decay, wd), ("no_decay", keep, 0.0)):
            if members:
                groups.append(
                    {**extra, "params": members, "lr": lr, "initial_lr": lr, "weight_decay": decay_value,
                     "name": f"{base}.{suffix}"}
                )

    missing = [names[id(p)] for p in trainable if id(p) not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} trainable parameter(s) are in no param group ({shown}); add them to a group or freeze "
            "them with requires_grad_(False)"
        )
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return groups


def _as_params(params: Any) -> Iterable[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


def build_optimizer(groups: list[dict[str, Any]], learning_rate: float, betas: tuple[float, float], eps: float):
    """torch AdamW over ``groups`` (decoupled weight decay, per-group lr and weight_decay)."""
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LambdaLR that multiplies every group's ``initial_lr`` by :class:`WarmupCosine`; step it once per optimizer
    step (skipped steps included), so the lr of step ``s`` is ``initial_lr * WarmupCosine(s)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
