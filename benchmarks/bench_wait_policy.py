"""OpenMP wait policy for CPU training: ``arlow pretrain`` with ``OMP_WAIT_POLICY=ACTIVE`` (OpenMP's spinning
default) against ``PASSIVE`` (what the ``arlow`` command sets unless the user has), idle and beside busy processes.

Each run is a fresh ``arlow pretrain`` (the built-in tiny demo) for ``--steps`` steps; the figure is the training
time the run reports (``elapsed`` in its summary, start-up excluded). Policies alternate so drift in the machine's
load hits both alike; ``--load K`` starts K busy Python loops for the loaded rows (a shared host: other jobs, other
test runs).

    python benchmarks/bench_wait_policy.py --steps 100 --repeats 3 --load 0 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager

BUSY = "while True: pass"


@contextmanager
def busy_processes(count: int):
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def train_seconds(policy: str, steps: int) -> float:
    """Training time of one ``arlow pretrain`` run under ``policy``."""
    env = dict(os.environ, OMP_WAIT_POLICY=policy, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(["arlow", "pretrain", f"train.output_dir={out}", f"train.max_steps={steps}",
                               f"train.save_every={steps}"], env=env, capture_output=True, text=True, check=True)
    summary = done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1]
    return float(json.loads(summary)["elapsed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, nargs="+", default=[0, 2], help="busy processes beside the run")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, steps per run: {args.steps}, repeats: {args.repeats}")
    print("| busy processes | ACTIVE s (median) | PASSIVE s (median) | ACTIVE / PASSIVE |")
    print("|---|---|---|---|")
    for load in args.load:
        times: dict[str, list[float]] = {"ACTIVE": [], "PASSIVE": []}
        with busy_processes(load):
            for _ in range(args.repeats):
                for policy in times:
                    times[policy].append(train_seconds(policy, args.steps))
        a, p = statistics.median(times["ACTIVE"]), statistics.median(times["PASSIVE"])
        print(f"| {load} | {a:.1f} ({', '.join(f'{t:.1f}' for t in times['ACTIVE'])}) "
              f"| {p:.1f} ({', '.join(f'{t:.1f}' for t in times['PASSIVE'])}) | {a / p:.2f} |", flush=True)


if __name__ == "__main__":
    main()
