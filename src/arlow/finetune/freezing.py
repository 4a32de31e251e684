"""Named parameter groups of the VLM: which train, at which learning rate, and a report of both.

Every parameter of an :class:`~arlow.modeling.multimodal.ArlowForConditionalGeneration` (bare, or wrapped by PEFT)
belongs to exactly one group:

=====================  ============================================================================================
group                  parameters
=====================  ============================================================================================
``vision_encoder``     ``model.visual.patch_embed``, ``model.visual.progressive_proj``, ``model.visual.blocks.*``
``merger``             ``model.visual.merger.*`` (vision tokens -> text width)
``deepstack_mergers``  ``model.visual.deepstack_mergers.*`` (intermediate vision features -> text width)
``gates``              ``model.language_model.visual_gates`` (DeepStack gates, when the config has them)
``embeddings``         ``model.language_model.embed_tokens``, ``lm_head`` (tied or not)
``language_model``     ``model.language_model.layers.*``, ``model.language_model.norm``
``lora``               LoRA adapter matrices added by PEFT (``lora_A`` / ``lora_B`` ...)
=====================  ============================================================================================

The DeepStack mergers are a group of their own on purpose: freezing "the vision encoder" must not silently
freeze (or leave trainable) the mergers that feed the language model (peers-and-anchors B.21).
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

__all__ = ["GROUPS", "group_of", "parameter_groups", "apply_freezing", "optimizer_groups", "trainable_report",
           "format_report"]

GROUPS = ("vision_encoder", "merger", "deepstack_mergers", "gates", "embeddings", "language_model", "lora")

_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)+")
_RULES = (
    ("lora", re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")),
    ("deepstack_mergers", re.compile(r"^model\.visual\.deepstack_mergers\.")),
    ("merger", re.compile(r"^model\.visual\.merger\.")),
    ("vision_encoder", re.compile(r"^model\.visual\.")),
    ("gates", re.compile(r"^model\.language_model\.visual_gates$")),
    ("embeddings", re.compile(r"^(model\.language_model\.embed_tokens\.|lm_head\.)")),
    ("language_model", re.compile(r"^model\.language_model\.")),
)


def _plain_name(name: str) -> str:
    """The VLM's own parameter name: PEFT's ``base_model.model.`` prefix and ``.base_layer`` removed."""
    return _PEFT_PREFIX.sub("", name).replace(".base_layer.", ".")


def group_of(name: str) -> str:
    """The group of parameter ``name`` (as ``named_parameters`` gives it, PEFT-wrapped or not)."""
    plain = _plain_name(name)
    for group, pattern in _RULES:
        if pattern.search(plain):
            return group
    raise ValueError(f"parameter {name!r} belongs to none of the groups {GROUPS}; is this an Arlow VLM "
                     "(ArlowForConditionalGeneration)?")


def parameter_groups(model: nn.Module) -> "OrderedDict[str, list[tuple[str, nn.Parameter]]]":
    """``{group: [(name, parameter), ...]}`` for every group in :data:`GROUPS` (empty lists included)."""
    groups: OrderedDict[str, list] = OrderedDict((g, []) for g in GROUPS)
    for name, param in model.named_parameters():
        groups[group_of(name)].append((name, param))
    return groups


def _check_names(names, what: str) -> None:
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown} in {what}; the groups are {list(GROUPS)}")


def apply_freezing(model: nn.Module, trainable: list[str]) -> dict[str, int]:
    """Make exactly the groups in ``trainable`` trainable (``requires_grad``) and freeze every other parameter.

    Returns ``{group: trainable parameter count}``. Raises ``ValueError`` for an unknown group name, and when
    nothing would train.
    """
    _check_names(trainable, "trainable groups")
    wanted = set(trainable)
    counts = {}
    for group, params in parameter_groups(model).items():
        on = group in wanted
        for _, param in params:
            param.requires_grad_(on)
        counts[group] = sum(p.numel() for _, p in params) if on else 0
    if not any(counts.values()):
        present = [g for g, ps in parameter_groups(model).items() if ps]
        raise ValueError(f"the trainable groups {sorted(wanted)} hold no parameter of this model; its groups with "
                         f"parameters are {present}")
    return counts


def optimizer_groups(model: nn.Module, lr: dict[str, float] | None = None,
                     weight_decay: dict[str, float] | None = None) -> list[dict]:
    """``param_groups`` for :class:`arlow.training.Trainer`: one named group per trainable group, with its own
    ``lr`` / ``weight_decay`` where given (the others use the training config's values)."""
    lr, weight_decay = dict(lr or {}), dict(weight_decay or {})
    _check_names(lr, "per-group learning rates")
    _check_names(weight_decay, "per-group weight decay")
    out = []
    for group, params in parameter_groups(model).items():
        live = [p for _, p in params if p.requires_grad]
        if not live:
            continue
        entry = {"params": live, "name": group}
        if group in lr:
            entry["lr"] = float(lr[group])
        if group in weight_decay:
            entry["weight_decay"] = float(weight_decay[group])
        out.append(entry)
    frozen_with_lr = [g for g in lr if not any(e["name"] == g for e in out)]
    if frozen_with_lr:
        raise ValueError(f"learning rates were given for groups that do not train: {frozen_with_lr}; add them to the "
                         "trainable groups or remove their lr")
    return out


def trainable_report(model: nn.Module, lr: dict[str, float] | None = None,
                     default_lr: float | None = None) -> list[dict]:
    """One row per group: ``{"group", "params", "trainable", "lr"}`` (lr None for frozen groups)."""
    rows = []
    for group, params in parameter_groups(model).items():
        total = sum(p.numel() for _, p in params)
        live = sum(p.numel() for _, p in params if p.requires_grad)
        rate = (lr or {}).get(group, default_lr) if live else None
        rows.append({"group": group, "params": total, "trainable": live, "lr": rate})
    return rows


def format_report(rows: list[dict]) -> str:
    """The report as an aligned text table with a total line."""
    lines = [f"{'group':<18} {'parameters':>13} {'trainable':>13} {'lr':>9}"]
    for row in rows:
        lr = f"{row['lr']:.2e}" if row["lr"] is not None else "frozen" if row["params"] else "-"
        lines.append(f"{row['group']:<18} {row['params']:>13,} {row['trainable']:>13,} {lr:>9}")
    total = sum(r["params"] for r in rows)
    live = sum(r["trainable"] for r in rows)
    lines.append(f"{'total':<18} {total:>13,} {live:>13,} {100 * live / max(total, 1):>8.2f}%")
    return "\n".join(lines)
