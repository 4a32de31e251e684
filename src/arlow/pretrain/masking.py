"""Merge-window masking for MAE pretraining (design D6). Pure index arithmetic, no model.

The masking unit is one merge window: the ``s x s`` patches that the encoder merges into one token, in one
temporal slice. Videos use tube masking: the same windows are masked in every temporal slice, so a masked window
cannot be copied from the neighbouring frame (VideoMAE's argument). Per item of grid ``(t, h, w)`` there are
``W = (h / s) * (w / s)`` windows per slice, ``t * W`` in all; ``max(1, int(W * (1 - mask_ratio)))`` windows per
slice stay visible.

Window ``j`` of an item is at slice ``j // W``, row ``(j % W) // (w / s)``, column ``(j % W) % (w / s)``; its
patch rows are ``j * s**2 ... j * s**2 + s**2 - 1`` (the encoder's merge-window-major row order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WindowMask", "windows_per_slice", "num_visible_windows", "sample_window_mask", "window_positions"]


def windows_per_slice(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """``(n, 3) -> (n,)`` merge windows in one temporal slice of each item."""
    return (grid_thw[:, 1] // merge_size) * (grid_thw[:, 2] // merge_size)


def num_visible_windows(windows: int, mask_ratio: float) -> int:
    """Visible windows per slice: at least one, so the encoder always has input."""
    return max(1, int(windows * (1.0 - mask_ratio)))


@dataclass
class WindowMask:
    """The result of masking a packed batch.

    Attributes:
        masked: ``(sum_i t_i * W_i,)`` bool, True where the window is hidden from the encoder.
        visible_rows: ``(N_visible_patches,)`` long indexes into the packed patch rows, items in order, each
            visible window's ``s**2`` rows contiguous.
        visible_lengths: ``(n,)`` visible patch rows of each item.
        window_counts: ``(n,)`` windows (``t * W``) of each item.
    """

    masked: torch.Tensor
    visible_rows: torch.Tensor
    visible_lengths: torch.Tensor
    window_counts: torch.Tensor


def sample_window_mask(grid_thw: torch.Tensor, merge_size: int, mask_ratio: float,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> WindowMask:
    """Choose the visible windows of every item (tube masking over time).

    Args:
        grid_thw: ``(n, 3)`` patch-unit grids.
        mask_ratio: fraction of windows per slice to hide, in ``[0, 1)``.
        noise: optional ``(sum_i W_i,)`` scores, one per window of one slice of each item (items concatenated);
            the windows with the smallest scores stay visible. Inject it for deterministic tests; otherwise it is
            drawn uniformly (from ``generator`` if given).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    s2 = merge_size**2
    per_slice = windows_per_slice(grid_thw, merge_size)
    total = int(per_slice.sum())
    if noise is None:
        noise = torch.rand(total, generator=generator)
    elif noise.shape != (total,):
        raise ValueError(f"noise must have shape ({total},) (one score per window of one slice per item), "
                         f"got {tuple(noise.shape)}")
    masked, rows, lengths, counts = [], [], [], []
    row_offset, noise_offset = 0, 0
    for (t, _, _), windows in zip(grid_thw.tolist(), per_slice.tolist()):
        keep = torch.argsort(noise[noise_offset:noise_offset + windows].cpu())[:num_visible_windows(windows, mask_ratio)]
        keep = keep.sort().values
        noise_offset += windows
        item_masked = torch.ones(t, windows, dtype=torch.bool)
        item_masked[:, keep] = False
        visible_windows = (torch.arange(t)[:, None] * windows + keep[None, :]).reshape(-1)
        item_rows = (visible_windows[:, None] * s2 + torch.arange(s2)[None, :]).reshape(-1)
        masked.append(item_masked.reshape(-1))
        rows.append(item_rows + row_offset)
        lengths.append(item_rows.numel())
        counts.append(t * windows)
        row_offset += t * windows * s2
    return WindowMask(
        masked=torch.cat(masked),
        visible_rows=torch.cat(rows),
        visible_lengths=torch.tensor(lengths, dtype=torch.long),
        window_counts=torch.tensor(counts, dtype=torch.long),
    )


def window_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """``(sum_i t_i * W_i, 3)`` integer (t, h // s, w // s) coordinates of every window, items concatenated."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh, ww = h // merge_size, w // merge_size
        tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(hh), torch.arange(ww), indexing="ij")
        out.append(torch.stack([tt, yy, xx], dim=-1).reshape(-1, 3))
    return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long)
