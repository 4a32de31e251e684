"""Small timing helpers shared by the benchmark scripts (not a test module).

The development machines are shared, so a single timing says little: :func:`interleaved_times` runs the
candidates round-robin (each repeat times every candidate once, in rotated order) so that a burst of load from
another process hits all of them alike, and the benchmarks report medians.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["interleaved_times", "interleaved_wall_and_cpu", "median", "machine_line", "markdown_table", "cpu_model",
           "mfu"]


def interleaved_times(candidates: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """Wall-clock seconds of each candidate, ``repeats`` times each, interleaved round-robin.

    Every candidate runs ``warmup`` times first (allocator and kernel caches); the order rotates each round so no
    candidate always runs right after the same neighbour.
    """
    return interleaved_wall_and_cpu(candidates, repeats, warmup)[0]


def interleaved_wall_and_cpu(candidates: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1
                             ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Like :func:`interleaved_times`, also returning this process's CPU seconds (all threads) per run.

    CPU time is less sensitive than wall time to other processes competing for the cores (it does not count the
    time this process waits for a core), so on a shared machine it ranks implementations more reliably.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return wall, cpu


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming the date, CPU, threads and library versions, for result files."""
    import transformers

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = ", ".join(flag for flag in ("avx512f", "avx512_bf16", "amx_tile") if flag in text)
    except OSError:
        pass
    return (f"{datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads; {flags or 'no AVX-512'}), torch {torch.__version__}, transformers {transformers.__version__}")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mfu(achieved: float, peak: float) -> str:
    """Model FLOPs utilisation ``achieved / peak`` (FLOP/s) as a percentage; "n/a" where the dtype has no hardware
    path (bf16 without avx512_bf16 measures a fallback below 1 GFLOP/s, which makes any ratio meaningless)."""
    return f"{100 * achieved / peak:.1f}%" if peak >= 1e9 else "n/a (no fast path)"
