"""``arlow sft`` (stage 3): instruction tuning on conversations, with the loss on the assistant turns only.

Conversations use the processor's chat format (multi-turn, any number of images and videos per conversation,
text-only conversations mixed in) or LLaVA's. Full fine-tuning of the language model (default), or LoRA / QLoRA
adapters through PEFT (``lora.enabled: true``, ``lora.quantization: 4bit``). See :mod:`arlow.finetune.stage` for the
recipe format and docs/finetuning.md.

    arlow sft                                     # the tiny demo recipe
    arlow sft --config sft_lora model.path=runs/align/checkpoint-1000 data.train=chat.jsonl
"""

from __future__ import annotations

import argparse

from .stage import run_stage


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "sft")
