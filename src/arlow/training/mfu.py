"""Model-FLOPs utilisation (MFU): a training step's FLOPs, a measured matmul peak, and their ratio.

A training step costs 3x the forward (backward = 2x forward), without activation recompute. The forward FLOPs of
each architecture come from its formula next to the model (:mod:`arlow.modeling.flops` lists them); the engine
knows no model and only receives ``flops_per_batch``. MFU = achieved model FLOPs per second / peak FLOPs per second
of the devices used, where the peak is *measured* on this machine with a large square matmul (the best any model
can do), not a datasheet number; on CPUs, the faster of aten's matmul and oneDNN's (on AMD processors aten's fp32
matmul, MKL, runs at about half oneDNN's speed; docs/cpu-inference.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


TRAIN_FLOPS_MULTIPLIER = 3.0  # forward + backward (2x forward)

_PEAK_CACHE: dict[tuple[str, str, int], float] = {}


def train_flops(forward_flops: float) -> float:
    """FLOPs of a training step (forward + backward) from the forward FLOPs."""
    return TRAIN_FLOPS_MULTIPLIER * forward_flops


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", size: int | None = None) -> float:
    """Measured FLOP/s of a square ``size x size`` matmul on ``device`` in ``dtype`` (best of a few timed runs; on CPU
    the faster of ``torch.matmul`` and oneDNN).

    Cached per (dtype, device, size) for the life of the process, so the engine pays for it once. ``size`` defaults
    to 2048 on CPU and 8192 on GPUs (large enough to reach the tensor-core peak). Uses a private random generator so
    that measuring never changes the global RNG streams (exact resume depends on them).
    """
    device = torch.device(device)
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    key = (str(dtype), str(device), int(size))
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    flops = 2.0 * size**3

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    kernels = [lambda: torch.matmul(a, b)]
    onednn = _onednn_matmul(dtype) if device.type == "cpu" else None
    if onednn is not None:
        kernels.append(lambda: onednn(a, b))  # a @ b.T: the same FLOPs through oneDNN
    best = min(_best_time(kernel, sync) for kernel in kernels)
    peak = flops / best
    _PEAK_CACHE[key] = peak
    return peak


def _onednn_matmul(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``(a, b) -> a @ b.T`` through oneDNN where this PyTorch build and CPU have it for ``dtype``, else ``None``."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return None
    if dtype not in (torch.float32, torch.bfloat16) or (
            dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    return lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _best_time(kernel: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds per call of ``kernel``: ~0.2 s per timing (at least one call), best of 3 timings."""
    kernel()  # warm-up: kernel selection, page faults
    sync()
    start = time.perf_counter()
    kernel()
    sync()
    reps = max(1, int(0.2 / max(time.perf_counter() - start, 1e-9)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            kernel()
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def model_flops_utilisation(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved ``flops / seconds`` as a fraction of ``peak_flops_per_s`` (the peak of all devices used)."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"seconds and peak must be > 0, got {seconds}, {peak_flops_per_s}")
    return flops / seconds / peak_flops_per_s
