"""Stages 2 and 3: multimodal alignment (``arlow align``) and instruction tuning (``arlow sft``).

Modules, bottom up: :mod:`.sources` (where records come from), :mod:`.examples` (records -> ids, labels, media;
loss masks and truncation), :mod:`.collate` (micro-batches, the dummy vision row), :mod:`.data` (length-grouped,
sharded, resumable pipeline), :mod:`.freezing` (named parameter groups), :mod:`.lora` (PEFT LoRA / QLoRA),
:mod:`.stage` (recipe -> engine run; :mod:`.align` and :mod:`.sft` are the commands), :mod:`.scoring` (multiple-choice
accuracy). The shapes data set is :mod:`arlow.data.shapes`, the end-to-end demonstration :mod:`arlow.demos.shapes`.
See docs/finetuning.md.
"""

from .collate import DummyVision, collate_examples
from .data import FinetuneData, pack_by_length
from .examples import Example, ExampleEncoder, RejectedExample, truncate
from .freezing import GROUPS, apply_freezing, format_report, group_of, optimizer_groups, trainable_report
from .lora import LoraSettings, apply_lora, load_adapter, merge_adapter, save_adapter
from .sources import record_source
from .stage import finetune, load_recipe, model_folder

__all__ = [
    "GROUPS", "DummyVision", "Example", "ExampleEncoder", "FinetuneData", "LoraSettings", "RejectedExample",
    "apply_freezing", "apply_lora", "collate_examples", "finetune", "format_report", "group_of", "load_adapter",
    "load_recipe", "merge_adapter", "model_folder", "optimizer_groups", "pack_by_length", "record_source",
    "save_adapter", "trainable_report", "truncate",
]
