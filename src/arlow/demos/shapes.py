"""The end-to-end demonstration: MAE pretraining -> alignment -> instruction tuning of a tiny VLM on generated
shapes, then accuracy on held-out images and clips, against the same pipeline trained and tested on blanked media.

Every stage is the real command's code path (``arlow pretrain``, ``arlow create-model``, ``arlow align``,
``arlow sft`` as Python calls, with the recipes in ``arlow/configs/finetune/shapes_*.yaml``):

1. :func:`~arlow.data.shapes.write_shapes_dataset` writes images, clips, captions, conversations and held-out
   questions (``blank=True``: the same texts over flat grey media).
2. ``arlow pretrain`` trains a tiny encoder (width 64, 4 blocks) with MAE on the generated images and clips.
3. A random tiny ``ArlowForCausalLM`` (width 64, 2 layers, 2 heads, the built-in 8,192-token tokenizer; see
   :func:`write_text_model`) is assembled with the exported encoder by ``arlow create-model``'s code; the processor is
   set to keep the generated sizes.
4. ``arlow align`` trains on captions, ``arlow sft`` on conversations.
5. :func:`~arlow.finetune.scoring.accuracy_by_task` scores the candidate answers of every held-out question.

``scripts/demo_shapes_pipeline.py`` runs it from the command line; ``tests/test_finetune_e2e.py`` runs a short
version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..assemble import create_model
from ..configuration import ArlowTextConfig
from ..data.shapes import MEDIA_SETTINGS, eval_items, write_shapes_dataset
from ..finetune.scoring import accuracy_by_task
from ..finetune.stage import finetune, load_recipe, model_folder
from ..modeling.multimodal import ArlowForConditionalGeneration
from ..modeling.text import ArlowForCausalLM
from ..pretrain.run import load_recipe as load_pretrain_recipe, pretrain
from ..processing import ArlowImageProcessor, ArlowProcessor, ArlowVideoProcessor, load_default_tokenizer
from ..training.logs import read_log

__all__ = ["DemoSettings", "SHORT", "FULL", "run_pipeline", "configure_processor", "evaluate"]


@dataclass
class DemoSettings:
    """Sizes and step counts of one demonstration run."""

    train_images: int = 600
    train_clips: int = 600  # 200 clips left motion at chance after 1,500 steps; 600 reach 0.57 (docs/finetuning.md)
    eval_images: int = 120
    eval_clips: int = 40
    pretrain_steps: int = 150
    align_steps: int = 150
    sft_steps: int = 1500
    text_layers: int = 2
    text_heads: int = 2  # head dim 32 at width 64
    rope_theta: float = 1e4
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # {"pretrain"|"align"|"sft": ["key=value", ...]}


FULL = DemoSettings()
SHORT = DemoSettings(train_images=160, train_clips=160, eval_images=48, eval_clips=24, pretrain_steps=20,
                     align_steps=30, sft_steps=1000)


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
        video_config=ArlowVideoProcessor(**patching, **bounds, fps=MEDIA_SETTINGS["fps"],
                                         max_frames=MEDIA_SETTINGS["max_frames"]),
        chat_template=processor.chat_template,
    )
    configured.save_pretrained(str(model_dir))


def write_text_model(folder: str | Path, settings: DemoSettings) -> Path:
    """A random ``ArlowForCausalLM`` of width 64 with the built-in tokenizer.

    Not the ``tiny`` preset: its head dim 16 with ``rope_theta`` 1e5 gives the w axis of M-RoPE frequencies of at most
    0.056 rad per token, so a 4 x 4 grid of vision tokens spans under 0.2 rad left to right and positions are nearly
    invisible to attention. Head dim 32 with ``rope_theta`` 1e4 gives 0.32 rad per token on w (0.56 on h).
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


def evaluate(model_dir: str | Path, eval_file: str | Path) -> dict:
    """Accuracy per task of the model folder (or run folder) on the held-out questions of ``eval_file``."""
    folder = model_folder(model_dir)
    model = ArlowForConditionalGeneration.from_pretrained(str(folder))
    processor = ArlowProcessor.from_pretrained(str(folder))
    return accuracy_by_task(model, processor, eval_items(eval_file))


def run_pipeline(root: str | Path, settings: DemoSettings = FULL, blank: bool = False, log=print) -> dict:
    """Run the whole demonstration under ``root`` (data, every stage's run folder, ``results.json``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    extra = settings.overrides
    timings, losses = {}, {}

    def stage(name, fn):
        start = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        log(f"[demo{' blank' if blank else ''}] {name}: {timings[name]} s")
        return out

    paths = stage("data", lambda: write_shapes_dataset(
        root / "data", train_images=settings.train_images, train_clips=settings.train_clips,
        eval_images=settings.eval_images, eval_clips=settings.eval_clips, seed=settings.seed, blank=blank))

    def first_last(run: Path) -> tuple[float, float]:
        records = [r for r in read_log(run / "log.jsonl") if r.get("loss") is not None]
        return records[0]["loss"], records[-1]["loss"]

    pretrain_dir = root / "pretrain"
    tree = load_pretrain_recipe(_recipe("shapes_pretrain"), [
        f"data.images={paths['train_images']}", f"data.videos={paths['train_clips']}",
        f"train.output_dir={pretrain_dir}", f"train.max_steps={settings.pretrain_steps}",
        f"train.seed={settings.seed}", f"train.log_every={_log_every(settings.pretrain_steps)}",
        "train.progress_bar=false", *extra.get("pretrain", [])])
    summary = stage("pretrain", lambda: pretrain(tree))
    losses["pretrain"] = first_last(pretrain_dir)

    def assemble():
        write_text_model(root / "text", settings)
        create_model(root / "vlm", vision_encoder=summary["last_checkpoint"], text_model=root / "text", overwrite=True)
        configure_processor(root / "vlm")

    stage("assemble", assemble)
    previous = root / "vlm"
    for name, data_file, steps in (("align", paths["captions"], settings.align_steps),
                                   ("sft", paths["chat"], settings.sft_steps)):
        run = root / name
        tree = load_recipe(name, _recipe(f"shapes_{name}"), [
            f"model.path={previous}", f"data.train={data_file}", f"train.output_dir={run}",
            f"train.max_steps={steps}", f"train.seed={settings.seed}", f"train.log_every={_log_every(steps)}",
            "train.progress_bar=false",
            *extra.get(name, [])])
        stage(name, lambda: finetune(tree, name))
        losses[name] = first_last(run)
        previous = run

    accuracy = stage("evaluate", lambda: evaluate(root / "sft", paths["eval"]))
    results = {"blank": blank, "settings": asdict(settings), "accuracy": accuracy, "losses_first_last": losses,
               "seconds": timings}
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
