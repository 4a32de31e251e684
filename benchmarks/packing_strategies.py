"""Two more ways to split a vision pack into attention calls, kept for comparison with the model's one
(``arlow.modeling.vision._build_layout``: one batched call per group of equal-length items).

* ``per_item``: one call per item (Qwen2-VL's approach on SDPA).
* ``block_diagonal``: one call over the whole pack with a dense ``(N, N)`` additive mask; O(N^2) memory.

All three give the same result (checked by :func:`check`); ``bench_vision.py`` times them. Use as
``with packing("per_item"): model(pixel_values, grid_thw)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

import arlow.modeling.vision as vision
from arlow.modeling.rope import cu_seqlens_from_lengths

STRATEGIES = ("grouped", "per_item", "block_diagonal")


def _bias(coords, config):
    return vision.locality_bias(coords, config.deformable_attention_strength, config.deformable_attention_window)


def per_item_layout(lengths, coords, config, dtype, device, merge_rows, whole_pack):
    """One segment per item, in input order (no reordering)."""
    if whole_pack:
        return _grouped(lengths, coords, config, dtype, device, merge_rows, whole_pack)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    segments = []
    for i, n in enumerate(lengths):
        rows = slice(starts[i], starts[i + 1])
        mask = None if coords is None else _bias(coords[rows], config)[None, None].to(dtype)
        segments.append(vision._Segment(starts[i], 1, n, mask))
    cu = cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.long)).to(device)
    return vision._PackedLayout(segments, cu, max(lengths))


def block_diagonal_layout(lengths, coords, config, dtype, device, merge_rows, whole_pack):
    """One segment over the whole pack; rows of different items separated by the most negative score."""
    if whole_pack:
        return _grouped(lengths, coords, config, dtype, device, merge_rows, whole_pack)
    total = sum(lengths)
    item = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    same = item[:, None] == item[None, :]
    mask = torch.zeros(total, total, dtype=torch.float32, device=device) if coords is None else _bias(coords, config)
    mask = mask.masked_fill(~same, torch.finfo(dtype).min).to(dtype)
    cu = cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.long)).to(device)
    return vision._PackedLayout([vision._Segment(0, 1, total, mask[None, None])], cu, max(lengths))


_grouped = vision._build_layout
_LAYOUTS = {"grouped": _grouped, "per_item": per_item_layout, "block_diagonal": block_diagonal_layout}


@contextmanager
def packing(strategy: str):
    """Run the vision encoder with another packing strategy inside the ``with`` block."""
    if strategy not in _LAYOUTS:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {STRATEGIES}")
    vision._build_layout = _LAYOUTS[strategy]
    try:
        yield
    finally:
        vision._build_layout = _grouped


def check(model, pixel_values, grid_thw, **kwargs) -> float:
    """Largest difference between the strategies' outputs and the model's own (should be fp rounding)."""
    with torch.no_grad():
        want = model(pixel_values, grid_thw, **kwargs).last_hidden_state
        worst = 0.0
        for strategy in STRATEGIES:
            with packing(strategy):
                got = model(pixel_values, grid_thw, **kwargs).last_hidden_state
            worst = max(worst, float((got - want).abs().max()))
    return worst
