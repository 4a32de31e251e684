"""Patch-row normalisation, wherever it runs: in a data worker, or on the training device as a step's first op.

The data pipelines (``PretrainData``, ``StreamingPretrainData``) cut patches from uint8 pixels. With
``normalise=False`` they hand those uint8 rows over as they are (a quarter of the bytes to pin and copy) and
``arlow pretrain`` normalises them on the training device (:class:`DeviceNormaliser`, the engine's ``on_device``
hook): the float work leaves the CPU workers, which are what limits how many samples a GPU gets. Both places use
:func:`normalise_rows`, so a row is the same number either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["normalise_rows", "DeviceNormaliser"]


def _affine(mean: Sequence[float], std: Sequence[float], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` shaped ``(1, C, 1)``: ``x / (255 std) - mean / std`` = ``(x / 255 - mean) / std``."""
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ValueError(f"need one positive std per mean, got mean {tuple(mean)} std {tuple(std)}")
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device)
    return scale.view(1, -1, 1), shift.view(1, -1, 1)


def normalise_rows(rows: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 patch rows ``(N, C*Tp*P*P)`` (row layout ``(C, Tp, P, P)``) -> float32 ``(N, C*Tp*P*P)``: each value
    rescaled to [0, 1] and normalised with its channel's ``mean`` / ``std``, on ``rows``' device.

    ``out``: a float32 ``(N, C*Tp*P*P)`` tensor already holding the rows cast to float (the data worker casts while
    concatenating a micro-batch); it is normalised in place and returned.
    """
    if out is None:
        if rows.dtype != torch.uint8 or rows.dim() != 2:
            raise ValueError(f"expected uint8 patch rows (N, C*Tp*P*P), got {rows.dtype} {tuple(rows.shape)}")
        out = rows.to(torch.float32)
    channels = len(mean)
    if out.shape[-1] % channels:
        raise ValueError(f"a row of {out.shape[-1]} values does not split into {channels} channels")
    scale, shift = _affine(mean, std, out.device)
    view = out.view(out.shape[0], channels, -1)
    torch.addcmul(shift, view, scale, out=view)
    return out


class DeviceNormaliser:
    """The MAE step's first op, on the training device: a micro-batch's uint8 ``pixel_values`` -> normalised
    float32 (:func:`normalise_rows`). Float ``pixel_values`` (a pipeline run with ``normalise=True``) are already
    normalised and pass as they are. Use as the engine's ``on_device`` hook."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        _affine(mean, std, "cpu")  # check them now, not at the first step
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        inputs = dict(inputs)
        pixels = inputs.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
            inputs["pixel_values"] = normalise_rows(pixels, self.mean, self.std)
        return inputs
