"""``arlow align`` (stage 2): teach the mergers to speak the language model's language.

From an exported vision encoder and an ``ArlowForCausalLM`` (assembled on the fly, or a VLM folder made by
``arlow create-model``), train on image-caption and video-caption pairs with the loss on the caption tokens only.
By default the merger, the DeepStack mergers and the DeepStack gates train; the vision encoder and the language
model stay frozen (LLaVA's stage 1). See :mod:`arlow.finetune.stage` for the recipe format and docs/finetuning.md.

    arlow align                                   # the tiny demo recipe (a few minutes on a CPU)
    arlow align --config align model.path=runs/vlm data.train=captions.jsonl train.output_dir=runs/align
"""

from __future__ import annotations

import argparse

from .stage import run_stage


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "align")
