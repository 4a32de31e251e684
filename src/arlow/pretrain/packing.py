"""Token-budget packing (design D7) and the micro-batch format of MAE pretraining.

A micro-batch holds as many samples as fit in a budget of patch rows, not a fixed count: at 224 px an image is
256 rows and a 16-frame clip 2,048, so a fixed count of samples either wastes most of a batch or runs out of
memory when clips cluster. Packing is greedy and keeps the order of the samples, so it is a pure function of
the sequence of costs (the same plan on every rank and after a resume).

The micro-batch (what the MAE model and the training engine consume)::

    {"pixel_values": FloatTensor (sum_i N_i, C*Tp*P*P),  # items concatenated in order, merge-window-major rows
     "grid_thw": LongTensor (n, 3),                      # (t, h, w) of each item in patch units
     "num_samples": int,                                 # n
     "num_tokens": int,                                  # sum_i N_i = sum_i t_i * h_i * w_i
     "labels": LongTensor (n,)}                          # only when the sources have labels
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pack_by_budget", "collate_items", "patch_count"]


def patch_count(num_frames: int, height: int, width: int, patch_size: int, temporal_patch_size: int) -> int:
    """Patch rows of one item: ``ceil(F / Tp) * (H / P) * (W / P)`` (a clip is padded up to a multiple of Tp)."""
    t = -(-num_frames // temporal_patch_size)
    return t * (height // patch_size) * (width // patch_size)


def pack_by_budget(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Split ``range(len(costs))`` into consecutive groups whose costs sum to at most ``budget``.

    Greedy and order-preserving: a group is closed when the next sample would overflow it. A sample that costs
    more than the budget on its own gets a group of its own (never dropped); the caller may warn about it.
    Every index appears exactly once, in increasing order.

    Args:
        costs: patch rows of each sample, in order.
        budget: the most patch rows of a micro-batch.
    Returns:
        groups: list of lists of sample indices.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be a positive number of patch rows, got {budget}")
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, cost in enumerate(costs):
        if cost < 1:
            raise ValueError(f"sample {index} has cost {cost}; every sample costs at least one patch row")
        if current and used + cost > budget:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += cost
    if current:
        groups.append(current)
    return groups


def collate_items(rows: Sequence[torch.Tensor] | torch.Tensor, grids: Sequence[torch.Tensor],
                  labels: Sequence[int] | None = None) -> dict:
    """Concatenate per-item patch rows ``(N_i, D)`` and grids ``(3,)`` into one micro-batch dict (format above).

    ``rows`` may also be the items' rows already concatenated, ``(sum N_i, D)``, which is used as it is."""
    if not len(grids):
        raise ValueError("cannot collate an empty micro-batch")
    grid_thw = torch.stack([torch.as_tensor(g, dtype=torch.long) for g in grids])
    pixel_values = rows if isinstance(rows, torch.Tensor) else torch.cat(list(rows), dim=0)
    num_tokens = int(grid_thw.prod(dim=-1).sum())
    if pixel_values.shape[0] != num_tokens:
        raise ValueError(f"{pixel_values.shape[0]} patch rows for grids holding {num_tokens}")
    batch = {
        "pixel_values": pixel_values,
        "grid_thw": grid_thw,
        "num_samples": len(grids),
        "num_tokens": num_tokens,
    }
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch
