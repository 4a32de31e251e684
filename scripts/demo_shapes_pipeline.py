"""The end-to-end demonstration on a CPU: MAE pretraining -> alignment -> instruction tuning of a tiny VLM on
generated shapes, then accuracy on held-out images and clips (colour, count, position, direction of motion), next to
the same pipeline with every image and clip blanked. See docs/finetuning.md and arlow.demos.shapes.

    python scripts/demo_shapes_pipeline.py runs/shapes-demo            # both pipelines, about 13 min on 2 cores
    python scripts/demo_shapes_pipeline.py runs/shapes-demo --short    # the test's size
    python scripts/demo_shapes_pipeline.py runs/shapes-demo --only real
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder for the data, every stage's run and results.json")
    parser.add_argument("--short", action="store_true", help="the short version the test runs")
    parser.add_argument("--only", choices=("real", "blank"), help="run one of the two pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from arlow.demos.shapes import FULL, SHORT, run_pipeline

    settings = replace(SHORT if args.short else FULL, seed=args.seed)
    if args.sft_steps:
        settings = replace(settings, sft_steps=args.sft_steps)
    results = {}
    for name in ("real", "blank"):
        if args.only and name != args.only:
            continue
        results[name] = run_pipeline(os.path.join(args.output, name), settings, blank=name == "blank")
    print(f"\n{'task':<10} {'chance':>7} " + " ".join(f"{n:>7}" for n in results))
    tasks = sorted({t for r in results.values() for t in r["accuracy"]}, key=lambda t: (t == "all", t))
    for task in tasks:
        row = [results[n]["accuracy"].get(task, {}) for n in results]
        chance = row[0].get("chance", float("nan"))
        cells = " ".join(f"{r['accuracy']:>7.3f}" if r else f"{'-':>7}" for r in row)
        print(f"{task:<10} {chance:>7.3f} {cells}   (n={row[0].get('total')})")
    with open(os.path.join(args.output, "summary.json"), "w") as handle:
        json.dump({n: {"accuracy": r["accuracy"], "seconds": r["seconds"], "losses": r["losses_first_last"]}
                   for n, r in results.items()}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
