"""Pixels <-> flattened patch rows, the vision encoder's one input format (design D3).

A clip of ``T`` frames ``(T, C, H, W)`` with ``T % Tp == 0`` and ``H, W`` multiples of ``P * s`` becomes
``t * h * w`` rows (``t = T / Tp``, ``h = H / P``, ``w = W / P``) of ``C * Tp * P * P`` values ordered
``(C, Tp, P, P)``. Rows are ordered merge-window-major, ``(t, h // s, w // s, dh, dw)``, so the ``s * s``
patches that the encoder merges into one token are contiguous. An image is a clip of ``Tp`` identical frames.
Pure tensor functions, no model or processor state.
"""

from __future__ import annotations

import torch

__all__ = ["patchify", "unpatchify", "pad_frames"]


def pad_frames(frames: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """Repeat the last frame of ``(T, ...)`` until ``T`` is a multiple of the temporal patch size."""
    if frames.shape[0] == 0:
        raise ValueError("cannot pad an empty clip: it has no frames")
    missing = (-frames.shape[0]) % temporal_patch_size
    if missing:
        frames = torch.cat([frames, frames[-1:].expand(missing, *frames.shape[1:])], dim=0)
    return frames


def patchify(frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int):
    """``(T, C, H, W) -> (rows (t*h*w, C*Tp*P*P), grid_thw (3,) int64)``.

    Raises ``ValueError`` when ``T`` is not a multiple of ``Tp`` or ``H``/``W`` not multiples of ``P * s``.
    """
    if frames.dim() != 4:
        raise ValueError(f"patchify expects frames (T, C, H, W), got shape {tuple(frames.shape)}")
    T, C, H, W = frames.shape
    P, Tp, s = patch_size, temporal_patch_size, merge_size
    if T % Tp:
        raise ValueError(f"{T} frames is not a multiple of the temporal patch size {Tp}; pad with pad_frames()")
    if H % (P * s) or W % (P * s):
        raise ValueError(f"frame size {H}x{W} must be a multiple of patch_size*merge_size = {P * s} on both sides")
    t, h, w = T // Tp, H // P, W // P
    x = frames.reshape(t, Tp, C, h // s, s, P, w // s, s, P)
    # -> (t, h/s, w/s, dh, dw, C, Tp, P, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = x.reshape(t * h * w, C * Tp * P * P)
    return rows, torch.tensor([t, h, w], dtype=torch.long)


def unpatchify(rows: torch.Tensor, grid_thw, patch_size: int, temporal_patch_size: int, merge_size: int,
               channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for one item: ``(t*h*w, C*Tp*P*P) -> (t*Tp, C, h*P, w*P)``."""
    t, h, w = (int(v) for v in grid_thw)
    P, Tp, s, C = patch_size, temporal_patch_size, merge_size, channels
    if rows.shape != (t * h * w, C * Tp * P * P):
        raise ValueError(f"expected rows of shape {(t * h * w, C * Tp * P * P)} for grid {(t, h, w)}, "
                         f"got {tuple(rows.shape)}")
    x = rows.reshape(t, h // s, w // s, s, s, C, Tp, P, P)
    # -> (t, Tp, C, h/s, dh, P, w/s, dw, P)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * Tp, C, h * P, w * P)
