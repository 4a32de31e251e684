"""The end-to-end demonstration on a CPU: MAE pretraining -> alignment -> instruction tuning of a tiny VLM on
generated shapes, then accuracy on held-out images and clips (colour, count, position, direction of motion), each
with a 95% interval and an exact binomial test against chance, next to two controls that must fall to chance: the
trained model asked about another sample's media ("mismatched"), and the same pipeline trained on media shuffled
against their answers ("shuffled"). See docs/finetuning.md and arlow.demos.shapes.

    python scripts/demo_shapes_pipeline.py runs/shapes-demo                  # real + shuffled pipelines
    python scripts/demo_shapes_pipeline.py runs/shapes-demo --short          # the test's size
    python scripts/demo_shapes_pipeline.py runs/shapes-demo --only real --seed 1 --threads 1
    # choosing settings: a validation set, the test questions left alone, instruction tuning re-run on the same
    # earlier stages with a changed recipe value
    python scripts/demo_shapes_pipeline.py runs/v --short --only real --validation 60 --no-test
    python scripts/demo_shapes_pipeline.py runs/v --short --only real --validation 60 --no-test --start-at sft \
        --override sft:train.learning_rate=3e-3

Threads: ``--threads auto`` (the default) uses one thread per idle core - the cores minus the 1-minute load
average, at least one - so that on a loaded machine it runs single-threaded, which is faster there (more threads
than free cores wait on each other at every operation).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see docs/training.md


def auto_threads() -> int:
    """One thread per idle core: ``cpu_count - 1-minute load average``, rounded, at least 1."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: assume an idle machine
        load = 0.0
    return max(1, min(cores, round(cores - load)))


def threads_arg(value: str) -> int:
    if value == "auto":
        return auto_threads()
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--threads takes a positive integer or 'auto', got {value!r}")
    return int(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder for the data, every stage's run and summary.json")
    parser.add_argument("--short", action="store_true", help="the short version the test runs")
    parser.add_argument("--only", choices=("real", "shuffled"), help="run one of the two pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--validation", type=int, default=0, metavar="N",
                        help="also write and score a validation set of N questions per type (its own media)")
    parser.add_argument("--no-test", action="store_true", help="do not score the held-out test questions")
    parser.add_argument("--start-at", choices=("pretrain", "align", "sft"), default="pretrain",
                        help="reuse the earlier stages already in OUTPUT (a run with the same settings)")
    parser.add_argument("--override", action="append", default=[], metavar="STAGE:KEY=VALUE",
                        help="a recipe value for one stage (pretrain, align or sft), e.g. sft:train.max_steps=800")
    parser.add_argument("--threads", type=threads_arg, default="auto",
                        help="torch threads: a number, or 'auto' (default): one per idle core, at least one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from arlow.demos.shapes import FULL, SHORT, run_pipeline

    torch.set_num_threads(args.threads)
    print(f"[demo] {args.threads} thread(s)")
    settings = replace(SHORT if args.short else FULL, seed=args.seed, val_images=args.validation,
                       val_singles=args.validation, val_clips=args.validation)
    if args.sft_steps:
        settings = replace(settings, sft_steps=args.sft_steps)
    overrides = {}
    for item in args.override:
        stage, sep, value = item.partition(":")
        if not sep or stage not in ("pretrain", "align", "sft") or "=" not in value:
            parser.error(f"--override takes STAGE:KEY=VALUE with STAGE pretrain, align or sft, got {item!r}")
        overrides.setdefault(stage, []).append(value)
    settings = replace(settings, overrides=overrides)
    results = {}
    for name in ("real", "shuffled"):
        if args.only and name != args.only:
            continue
        out = run_pipeline(os.path.join(args.output, name), settings, shuffle_answers=name == "shuffled",
                           start_at=args.start_at, test=not args.no_test)
        if "validation" in out:
            results[f"{name}, validation"] = out["validation"]
        if "accuracy" in out:
            results[name] = out["accuracy"]
            results[f"{name}, mismatched media"] = out["mismatched"]
    print(format_table(results))
    with open(os.path.join(args.output, "summary.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


def format_table(results: dict[str, dict]) -> str:
    """One row per (evaluation, task): correct/total, accuracy, its 95% interval, the binomial p-value."""
    lines = [f"{'evaluation':<26} {'task':<9} {'right':>9} {'acc':>6} {'95% interval':>15} {'p vs chance':>12}"]
    for name, accuracy in results.items():
        for task in sorted(accuracy, key=lambda t: (t == "all", t)):
            a = accuracy[task]
            lo, hi = a["ci95"]
            lines.append(f"{name:<26} {task:<9} {a['correct']:>4}/{a['total']:<4} {a['accuracy']:>6.3f} "
                         f"{f'[{lo:.3f}, {hi:.3f}]':>15} {a['p_value']:>12.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
