"""Rotary position arithmetic shared by the vision encoder and the language model.

Everything here is a pure function of integers and grids (design D5): no module state, so it can be tested on
its own, cached, and computed outside a traced graph when exporting.

Conventions
-----------
* A head of ``D`` channels carries ``D / 2`` rotary frequencies ``inv_freq[j] = theta ** (-2j / D)``.
  Channel ``c`` and channel ``c + D/2`` form a rotated pair ("half-split" layout); ``cos``/``sin`` tables are
  ``cat([f, f], -1)`` of the per-frequency angles ``f``, and :func:`rotate_half` pairs the same channels, so
  :func:`apply_rotary` is an exact rotation (norms preserved, scores depend only on position offsets).
* Multi-axis positions (t, h, w) share the ``D / 2`` frequency slots between the axes: ``sections`` (in channels,
  each even) give each axis ``section / 2`` slots, assigned round-robin T, H, W, T, H, W, ... (the interleaved
  layout of Qwen3-VL) so every axis sees both high and low frequencies.
* Grids ``grid_thw`` are ``(n_items, 3)`` integer tensors in patch units; items are images or videos.
"""

from __future__ import annotations

import torch

__all__ = [
    "rotate_half",
    "apply_rotary",
    "rotate_pairs",
    "rope_inv_freq",
    "mrope_slot_axes",
    "multi_axis_angles",
    "vision_patch_positions",
    "cu_seqlens_from_lengths",
]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., D) -> (..., D)``: maps the pair (x_c, x_{c+D/2}) to (-x_{c+D/2}, x_c)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# Below this many elements the plain formula's few kernels beat the fused form's extra slicing (one-token decode);
# above it the fused form's single buffer beats five full-size temporaries (prefill, training, vision).
_FUSED_MIN_NUMEL = 1 << 16


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., D)`` by angles whose ``cos``/``sin`` (broadcastable to ``x``) use the half-split layout.

    Returns ``x * cos + rotate_half(x) * sin``, computed in fp32 (fp64 for fp64 input) and cast back, so bf16
    activations get an accurate rotation. Large inputs outside autograd go through four multiply-adds into one
    buffer (on CPU the negate/concatenate form costs several extra passes and allocations over q and k); small
    inputs and anything autograd records use the plain formula.
    """
    if (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)) \
            or x.numel() < _FUSED_MIN_NUMEL:
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        return (xf * cos.to(dtype) + rotate_half(xf) * sin.to(dtype)).to(x.dtype)
    return _rotate_fp32(x, cos, sin).to(x.dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(c, c + D/2)`` of ``x (..., D)`` by angles with ``cos/sin (..., D/2)`` (broadcast).

    :func:`apply_rotary` with half-width tables (one entry per frequency slot, as the vision encoder keeps them):
    the fused form outside autograd, the plain formula under it. Math in fp32, result in ``x.dtype``.
    """
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return apply_rotary(x, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    return _rotate_fp32(x, cos, sin).to(x.dtype)


def _rotate_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in fp32 (fp64 for fp64) into one buffer: ``out1 = x1 c - x2 s``,
    ``out2 = x2 c + x1 s``. ``cos``/``sin`` are half-split tables (whose two halves are equal, so ``c, s`` are the
    first halves) or half-width ones."""
    half = x.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)  # one up-cast pass; same-dtype kernels below are faster than mixed bf16/fp32 ones
    c, s = cos[..., :half].to(dtype), sin[..., :half].to(dtype)
    x1, x2 = x[..., :half], x[..., half:]
    if torch.compiler.is_compiling():
        # out= writes into views break torch.compile's graph; the compiler fuses this form into one kernel anyway
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    shape = x.shape
    lead, table = x.shape[:-1], cos.shape[:-1]  # tables may be D or D/2 wide; only their leading dims broadcast
    if (cos.dim() > x.dim() or sin.shape != cos.shape
            or any(b != a and b != 1 for a, b in zip(reversed(lead), reversed(table)))):
        shape = torch.broadcast_shapes(lead, table) + x.shape[-1:]  # tables wider than x (slow, so rare)
    out = torch.empty(shape, dtype=dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-1.0)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s)
    return out


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``(head_dim / 2,)`` float32 inverse frequencies ``theta ** (-2j / head_dim)``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def mrope_slot_axes(sections: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Which axis (0 = t, 1 = h, 2 = w) drives each of the ``sum(sections) / 2`` frequency slots.

    Slots are dealt round-robin over the axes that still have budget: [32, 32, 32] -> 0,1,2,0,1,2,...;
    [20, 22, 22] -> 0,1,2 repeated ten times, then 1,2.
    """
    budget = [s // 2 for s in sections]
    total = sum(budget)
    axes: list[int] = []
    axis = 0
    while len(axes) < total:
        if budget[axis] > 0:
            axes.append(axis)
            budget[axis] -= 1
        axis = (axis + 1) % len(budget)
    return torch.tensor(axes, dtype=torch.long)


def multi_axis_angles(positions: torch.Tensor, inv_freq: torch.Tensor, slot_axes: torch.Tensor) -> torch.Tensor:
    """Per-slot rotary angles for multi-axis positions.

    Args:
        positions: ``(..., 3)`` positions along (t, h, w) (int or float).
        inv_freq: ``(D/2,)`` inverse frequencies.
        slot_axes: ``(D/2,)`` axis index of each slot (:func:`mrope_slot_axes`).
    Returns:
        ``(..., D/2)`` float32 angles; ``cat([a, a], -1)`` gives the half-split table for :func:`apply_rotary`.
    """
    picked = positions.float().index_select(-1, slot_axes.to(positions.device))
    return picked * inv_freq.to(positions.device)


def vision_patch_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Integer (t, h, w) position of every patch, items concatenated, in merge-window-major order.

    Within an item the order is (t, h // s, w // s, dh, dw): the ``s * s`` patches of each merge window are
    contiguous, matching the processor's patch rows.

    Args:
        grid_thw: ``(n_items, 3)`` patch-unit grids; h and w divisible by ``merge_size``.
    Returns:
        ``(sum(t*h*w), 3)`` int64.
    """
    out = []
    s = merge_size
    for t, h, w in grid_thw.tolist():
        ti = torch.arange(t).view(t, 1, 1, 1, 1)
        hi = (torch.arange(h // s).view(1, -1, 1, 1, 1) * s + torch.arange(s).view(1, 1, 1, s, 1))
        wi = (torch.arange(w // s).view(1, 1, -1, 1, 1) * s + torch.arange(s).view(1, 1, 1, 1, s))
        shape = (t, h // s, w // s, s, s)
        out.append(torch.stack([ti.expand(shape), hi.expand(shape), wi.expand(shape)], dim=-1).reshape(-1, 3))
    if not out:
        return torch.zeros(0, 3, dtype=torch.long)
    return torch.cat(out).to(grid_thw.device)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``(n,) -> (n + 1,)`` int32 cumulative offsets with a leading 0 (the varlen flash-attention format)."""
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D (t, h, w) language-model positions for a batch with image/video placeholder runs (M-RoPE).

    Text tokens advance all three axes together. A run of ``t * h * w / s**2`` placeholder tokens (one item, in
    the order items appear, images and videos counted separately across the batch) gets
    ``start + (ti', hi, wi)`` over its merged grid ``(t, h / s, w / s)`` in raster order, where ``start`` is the
    position the next text token would have had; text after the item continues from the item's largest
    position + 1. For videos with ``second_per_grid_ts`` and ``tokens_per_second``, the temporal index follows real
    time: ``ti' = floor(ti * second_per_grid_ts[v] * tokens_per_second)``; otherwise ``ti' = ti``.
    Padding (``attention_mask == 0``) gets position 1 and is skipped. Placeholders of a modality whose grids are
    ``None`` (no media of that kind) are ordinary text tokens.

    Args:
        input_ids: ``(B, S)``.
        image_grid_thw, video_grid_thw: ``(n_images, 3)`` / ``(n_videos, 3)`` patch-unit grids, in order.
        attention_mask: ``(B, S)`` 1 for real tokens (left or right padding).
    Returns:
        ``position_ids (3, B, S)`` int64 and ``rope_deltas (B, 1)``: ``max position + 1 - S``, so that a token
        decoded at sequence index ``S + k`` sits at position ``S + k + delta``.
    Raises:
        ValueError: a placeholder run whose length does not match its grid, or more runs than grids.
    """
    B, S = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = torch.ones(3, B, S, dtype=torch.long, device=device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=device)
    # A modality without grids has no media: its placeholder ids are plain text tokens (transformers' contract).
    grids = {tok: grid for tok, grid in ((image_token_id, image_grid_thw), (video_token_id, video_grid_thw))
             if grid is not None}
    used = {image_token_id: 0, video_token_id: 0}
    s = spatial_merge_size
    for b in range(B):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep].tolist()
        row = torch.empty(3, len(ids), dtype=torch.long)
        i, nxt = 0, 0
        while i < len(ids):
            tok = ids[i]
            if tok not in grids:
                row[:, i] = nxt
                nxt += 1
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == tok:
                j += 1
            kind = "image" if tok == image_token_id else "video"
            grid = grids[tok]
            k = used[tok]
            if k >= len(grid):
                raise ValueError(f"found more {kind} placeholder runs than {kind} grids ({len(grid)} given)")
            t, h, w = (int(v) for v in grid[k])
            hh, ww = h // s, w // s
            if j - i != t * hh * ww:
                raise ValueError(f"{kind} {k}: a run of {j - i} placeholder tokens but its grid {[t, h, w]} needs "
                                 f"t*h*w/{s * s} = {t * hh * ww}; the processor must expand each placeholder")
            ti = torch.arange(t).view(t, 1, 1).expand(t, hh, ww)
            if kind == "video" and second_per_grid_ts is not None and tokens_per_second is not None:
                ti = (ti.float() * float(second_per_grid_ts[k]) * tokens_per_second).long()
            hi = torch.arange(hh).view(1, hh, 1).expand(t, hh, ww)
            wi = torch.arange(ww).view(1, 1, ww).expand(t, hh, ww)
            block = torch.stack([ti, hi, wi]).reshape(3, -1) + nxt
            row[:, i:j] = block
            nxt = int(block.max()) + 1
            used[tok] += 1
            i = j
        positions[:, b, keep] = row.to(device)
        deltas[b, 0] = (nxt if len(ids) else 0) - S
    return positions, deltas
