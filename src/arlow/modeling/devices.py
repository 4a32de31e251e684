"""Moving small host-built tensors (indices, positions, lengths) to the compute device without stalling the host."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU -> CUDA copy goes through pinned memory with ``non_blocking=True``.

    A plain ``.to("cuda")`` from pageable memory makes the host wait until the copy is done, i.e. until every
    kernel queued before it has run: one such copy per index tensor per forward keeps the GPU's queue empty.
    From pinned memory the copy is queued like a kernel and the host goes on (PyTorch's pinned-memory cache keeps
    the source alive until the copy has run).
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
