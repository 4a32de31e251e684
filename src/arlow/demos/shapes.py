"""The end-to-end demonstration: MAE pretraining -> alignment -> instruction tuning of a tiny VLM on generated
shapes, then accuracy on held-out images and clips, with two controls that fail when the media carry no answer:
the same pipeline trained on media shuffled against their answers, and the trained model asked each held-out
question about another sample's media.

Every stage is the real command's code path (``arlow pretrain``, ``arlow create-model``, ``arlow align``,
``arlow sft`` as Python calls, with the recipes in ``arlow/configs/finetune/shapes_*.yaml``):

1. :func:`~arlow.data.shapes.write_shapes_dataset` writes images, clips, captions, conversations and held-out
   questions (``shuffle_answers=True``: every training medium paired with another sample's texts).
2. ``arlow pretrain`` trains a tiny encoder (width 64, 4 blocks) with MAE on the generated images and clips.
3. A random tiny ``ArlowForCausalLM`` (width 64, 2 layers, 4 heads, the built-in 8,192-token tokenizer; see
   :func:`write_text_model`) is assembled with the exported encoder by ``arlow create-model``'s code; the processor is
   set to keep the generated sizes.
4. ``arlow align`` trains on captions, ``arlow sft`` on conversations.
5. :func:`evaluate` scores the candidate answers of every held-out question
   (:func:`~arlow.finetune.scoring.accuracy_by_task`) and judges each accuracy against chance
   (:func:`~arlow.evaluation.binomial.judge`: 95% interval, exact one-sided binomial test); ``mismatch=True`` asks
   every question about another held-out sample's media of the same kind.

``scripts/demo_shapes_pipeline.py`` runs it from the command line; ``tests/test_finetune_e2e.py`` runs a short
version.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..assemble import create_model
from ..configuration import ArlowTextConfig
from ..data.shapes import MEDIA_SETTINGS, eval_items, write_shapes_dataset
from ..evaluation.binomial import judge
from ..finetune.scoring import accuracy_by_task
from ..finetune.stage import finetune, load_recipe, model_folder
from ..modeling.multimodal import ArlowForConditionalGeneration
from ..modeling.text import ArlowForCausalLM
from ..pretrain.run import load_recipe as load_pretrain_recipe, pretrain
from ..processing import ArlowImageProcessor, ArlowProcessor, ArlowVideoProcessor, load_default_tokenizer
from ..training.logs import read_log

__all__ = ["DemoSettings", "SHORT", "FULL", "run_pipeline", "configure_processor", "evaluate", "mismatched"]


@dataclass
class DemoSettings:
    """Sizes and step counts of one demonstration run."""

    train_images: int = 600
    train_clips: int = 600  # 200 clips left motion at chance after 1,500 steps; 600 reach 0.57 (docs/finetuning.md)
    eval_images: int = 100  # a colour and a count question each
    eval_singles: int = 100  # a position question each
    eval_clips: int = 100  # a motion question each
    val_images: int = 0  # a validation set (its own media and stream) for choosing settings; 0: none
    val_singles: int = 0
    val_clips: int = 0
    pretrain_steps: int = 150
    align_steps: int = 150
    sft_steps: int = 3000  # at 2,000 the losses still fell and position stayed at chance on a seed (docs)
    text_layers: int = 2
    text_heads: int = 4  # head dim 16 at width 64: more attention patterns to find the shape with (docs)
    rope_theta: float = 1e4
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # {"pretrain"|"align"|"sft": ["key=value", ...]}


FULL = DemoSettings()
SHORT = DemoSettings(train_images=320, train_clips=320, pretrain_steps=20, align_steps=30)


def _recipe(name: str) -> str:
    return str(resources.files("arlow") / "configs" / "finetune" / f"{name}.yaml")


def _log_every(steps: int) -> int:
    """About ten log records per stage, so that a short run still shows its first and last loss."""
    return max(1, steps // 10)


def configure_processor(model_dir: str | Path) -> None:
    """Give the model folder's processor the demo's media settings (:data:`arlow.data.shapes.MEDIA_SETTINGS`),
    so that ``AutoProcessor.from_pretrained(model_dir)`` keeps 112 px images and samples the clips' 8 frames."""
    processor = ArlowProcessor.from_pretrained(str(model_dir))
    ip = processor.image_processor
    patching = dict(patch_size=ip.patch_size, temporal_patch_size=ip.temporal_patch_size, merge_size=ip.merge_size)
    bounds = {k: MEDIA_SETTINGS[k] for k in ("min_pixels", "max_pixels")}
    configured = ArlowProcessor(
        ArlowImageProcessor(**patching, **bounds), processor.tokenizer,
        video_processor=ArlowVideoProcessor(**patching, **bounds, fps=MEDIA_SETTINGS["fps"],
                                         max_frames=MEDIA_SETTINGS["max_frames"]),
        chat_template=processor.chat_template,
    )
    configured.save_pretrained(str(model_dir))


def write_text_model(folder: str | Path, settings: DemoSettings) -> Path:
    """A random ``ArlowForCausalLM`` of width 64 (``settings.text_layers`` layers, ``settings.text_heads`` heads) with
    the built-in tokenizer.

    Four heads of 16 rather than two of 32: reading where the shape is needs a head whose attention picks out the
    shape's few tokens among the background's (the position is in those tokens' content, from the encoder's
    absolute table); with two heads no head did on the seed examined, with four, two heads did (docs/finetuning.md).
    ``rope_theta`` 1e4 keeps the M-RoPE angles between neighbouring vision tokens large enough to matter (the
    ``tiny`` preset's 1e5 with head dim 16 gives under 0.2 rad across a 4 x 4 grid).
    """
    tokenizer = load_default_tokenizer()
    config = ArlowTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.text_heads, num_key_value_heads=settings.text_heads,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": settings.rope_theta},
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
    )
    torch.manual_seed(settings.seed)
    ArlowForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


def mismatched(items: list[dict], seed: int = 0) -> list[dict]:
    """The held-out questions with every item's media swapped for another item's of the same task (a random cycle
    through each task's items, so none keeps its own): the answer no longer belongs to the media shown."""
    rng = random.Random(seed)
    out = [dict(item) for item in items]
    for task in {item["task"] for item in items}:
        members = [i for i, item in enumerate(items) if item["task"] == task]
        if len(members) < 2:
            raise ValueError(f"cannot mismatch the media of task {task!r}: it has {len(members)} question(s)")
        cycle = rng.sample(members, len(members))
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            out[a]["media"], out[a]["kind"] = items[b]["media"], items[b]["kind"]
    return out


def evaluate(model_dir: str | Path, eval_file: str | Path, mismatch: bool = False) -> dict:
    """Accuracy per task of the model folder (or run folder) on the held-out questions of ``eval_file`` (with
    ``mismatch``: about another sample's media, :func:`mismatched`), each judged against chance:
    ``{task: {"correct", "total", "chance", "accuracy", "ci95", "p_value", "chance_range99"}}``."""

    folder = model_folder(model_dir)
    model = ArlowForConditionalGeneration.from_pretrained(str(folder))
    processor = ArlowProcessor.from_pretrained(str(folder))
    items = eval_items(eval_file)
    accuracy = accuracy_by_task(model, processor, mismatched(items) if mismatch else items)
    return {task: {**a, **judge(a["correct"], a["total"], a["chance"])} for task, a in accuracy.items()}


STAGES = ("pretrain", "align", "sft")


def run_pipeline(root: str | Path, settings: DemoSettings = FULL, shuffle_answers: bool = False, log=print,
                 start_at: str = "pretrain", test: bool = True) -> dict:
    """Run the whole demonstration under ``root`` (data, every stage's run folder, ``results.json``).

    ``shuffle_answers``: train on media paired with other samples' texts (the control pipeline). The results hold
    ``accuracy`` on the held-out questions and ``mismatched`` (:func:`evaluate` with ``mismatch=True``), and with a
    validation set (``settings.val_*``) ``validation``: the accuracy on it.

    ``start_at``: ``"align"`` or ``"sft"`` reuses the earlier stages' folders already under ``root`` (from a run
    with the same settings; the data are rewritten, deterministically) - to try instruction-tuning settings without
    paying for the stages before. ``test=False`` skips the held-out test questions (while choosing settings on the
    validation set)."""

    if start_at not in STAGES:
        raise ValueError(f"start_at must be one of {STAGES}, got {start_at!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    extra = settings.overrides
    timings, losses = {}, {}

    def stage(name, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        log(f"[demo{' shuffled' if shuffle_answers else ''}] {name}: {timings[name]} s")
        return out

    paths = stage("data", lambda: write_shapes_dataset(
        root / "data", train_images=settings.train_images, train_clips=settings.train_clips,
        eval_images=settings.eval_images, eval_singles=settings.eval_singles, eval_clips=settings.eval_clips,
        val_images=settings.val_images, val_singles=settings.val_singles, val_clips=settings.val_clips,
        seed=settings.seed, shuffle_answers=shuffle_answers))
    skipped = STAGES[:STAGES.index(start_at)]
    for name in skipped:
        if not (root / name).is_dir():
            raise FileNotFoundError(f"start_at={start_at!r} reuses {root / name}, which does not exist: run the "
                                    f"pipeline from the start once with the same settings and root")

    def first_last(run: Path) -> tuple[float, float]:
        records = [r for r in read_log(run / "log.jsonl") if r.get("loss") is not None]
        return records[0]["loss"], records[-1]["loss"]

    pretrain_dir = root / "pretrain"
    if "pretrain" not in skipped:
        tree = load_pretrain_recipe(_recipe("shapes_pretrain"), [
            f"data.images={paths['train_images']}", f"data.videos={paths['train_clips']}",
            f"train.output_dir={pretrain_dir}", f"train.max_steps={settings.pretrain_steps}",
            f"train.seed={settings.seed}", f"train.log_every={_log_every(settings.pretrain_steps)}",
            "train.progress_bar=false", *extra.get("pretrain", [])])
        summary = stage("pretrain", lambda: pretrain(tree))

        def assemble():
            write_text_model(root / "text", settings)
            create_model(root / "vlm", vision_encoder=summary["last_checkpoint"], text_model=root / "text",
                         overwrite=True)
            configure_processor(root / "vlm")

        stage("assemble", assemble)
    losses["pretrain"] = first_last(pretrain_dir)
    previous = root / "vlm"
    for name, data_file, steps in (("align", paths["captions"], settings.align_steps),
                                   ("sft", paths["chat"], settings.sft_steps)):
        run = root / name
        if name in skipped:
            losses[name] = first_last(run)
            previous = run
            continue
        tree = load_recipe(name, _recipe(f"shapes_{name}"), [
            f"model.path={previous}", f"data.train={data_file}", f"train.output_dir={run}",
            f"train.max_steps={steps}", f"train.seed={settings.seed}", f"train.log_every={_log_every(steps)}",
            "train.progress_bar=false",
            *extra.get(name, [])])
        stage(name, lambda: finetune(tree, name))
        losses[name] = first_last(run)
        previous = run

    results = {"shuffle_answers": shuffle_answers, "settings": asdict(settings), "start_at": start_at}
    if "val" in paths:
        results["validation"] = stage("evaluate validation", lambda: evaluate(root / "sft", paths["val"]))
    if test:
        results["accuracy"] = stage("evaluate", lambda: evaluate(root / "sft", paths["eval"]))
        results["mismatched"] = stage("evaluate mismatched",
                                      lambda: evaluate(root / "sft", paths["eval"], mismatch=True))
    results.update(losses_first_last=losses, seconds=timings)
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
