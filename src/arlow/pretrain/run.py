"""``arlow pretrain``: wire the MAE model and the data pipeline into the training engine.

A recipe is a YAML file with four sections (see ``arlow/configs/pretrain/*.yaml``)::

    model:        ArlowMAEConfig fields; ``vision`` holds the ArlowVisionConfig fields; ``attn_implementation``
    data:         images / videos sources ("builtin" = the shipped media) and PretrainData settings
    train:        TrainConfig fields (arlow.training)
    reconstruct:  num_items (how many samples the PNG grid shows), seed

``arlow pretrain`` with no ``--config`` runs the tiny demo recipe on the built-in media. Any value can be
overridden on the command line with dotted keys: ``arlow pretrain train.max_steps=50 data.resolution=224``.
Every checkpoint holds the export ``vision_encoder/``, the processors and ``mae_decoder/`` (see
:mod:`arlow.pretrain.export`) and ``reconstructions.png``, written before the checkpoint is renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from ..data.augment import image_normalisation
from ..data.shards import is_prepared
from ..data.sources import resolve_builtin
from ..training import TrainConfig, Trainer
from ..configuration import ArlowVisionConfig
from ..training.config import check_keys, init_keys
from ..training.distributed import rank_and_world
from ..training.recipes import load_recipe as load_recipe_tree
from ..training.recipes import run_recipe_command
from .data import IMAGE, VIDEO, PretrainData
from .export import export_checkpoint, load_mae_checkpoint
from .mae import ArlowMAEConfig, ArlowMAEForPreTraining, mae_train_flops
from .packing import collate_items
from .pixels import DeviceNormaliser
from .plan import accumulation_for, check_plan, run_plan
from .reconstruct import save_reconstruction_grid, side_by_side
from .stream import StreamingPretrainData

__all__ = ["load_recipe", "build_model", "build_data", "pretrain", "run"]

logger = logging.getLogger(__name__)

SECTIONS = {"model": None, "data": None, "train": None, "reconstruct": None}


def load_recipe(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """The recipe tree (a YAML file or a recipe shipped in ``arlow/configs/pretrain/``; default ``tiny_demo``) after
    overrides, with unknown top-level sections and keys refused (naming the closest valid key)."""
    tree = load_recipe_tree("pretrain", config or "tiny_demo", overrides, SECTIONS)
    model = tree.get("model") or {}
    check_keys("model", model, init_keys(ArlowMAEConfig, exclude=["vision_config"]) + ["vision", "attn_implementation"])
    check_keys("model.vision", model.get("vision") or {}, init_keys(ArlowVisionConfig))
    check_keys("data", tree.get("data") or {}, init_keys(PretrainData, exclude=["vision_config", "seed", "rank",
                                                                                  "world_size"]) + ["tokens_per_step"])
    check_keys("reconstruct", tree.get("reconstruct") or {}, ["num_items", "seed"])
    check_keys("train", tree.get("train") or {}, [f.name for f in dataclasses.fields(TrainConfig)])
    return tree


def build_model(model_section: dict) -> ArlowMAEForPreTraining:
    section = dict(model_section or {})
    attn = section.pop("attn_implementation", "sdpa")
    vision = section.pop("vision", {})
    config = ArlowMAEConfig(vision_config=vision, **section)
    config.vision_config._attn_implementation = attn
    return ArlowMAEForPreTraining(config)


def build_data(data_section: dict, vision_config, seed: int) -> PretrainData:
    section = dict(data_section or {})
    section.pop("tokens_per_step", None)  # a step size, not a pipeline setting (see resolve_accumulation)
    images, videos = resolve_builtin(section.pop("images", "builtin"), section.pop("videos", None))
    rank, world = rank_and_world()
    for key in ("scale", "ratio"):
        if key in section:
            section[key] = tuple(section[key])
    # uint8 rows leave the workers; the step normalises them on the device (DeviceNormaliser in pretrain())
    section.setdefault("normalise", False)
    return data_class(images, videos)(images, videos, vision_config=vision_config, seed=seed, rank=rank,
                                      world_size=world, **section)


def data_class(images, videos) -> type[PretrainData]:
    """:class:`StreamingPretrainData` for prepared sets (``arlow prepare-data`` output, local or a URL),
    :class:`PretrainData` for files."""
    return StreamingPretrainData if any(is_prepared(s) for s in (images, videos)) else PretrainData


def resolve_accumulation(tree: dict, world_size: int) -> dict:
    """The ``train`` section with ``gradient_accumulation_steps`` derived from ``data.tokens_per_step`` when the
    recipe gives a step size in patch rows (the token budget of one optimizer step over all processes)."""
    train = dict(tree.get("train") or {})
    data = dict(tree.get("data") or {})
    tokens_per_step = data.get("tokens_per_step")
    if tokens_per_step is None:
        return train
    accumulation = accumulation_for(int(tokens_per_step), int(data.get("tokens_per_batch", 4096)), world_size)
    given = train.get("gradient_accumulation_steps")
    if given is not None and int(given) != accumulation:
        raise ValueError(
            f"train.gradient_accumulation_steps={given} contradicts data.tokens_per_step={tokens_per_step} "
            f"(= {accumulation} micro-batches of {data.get('tokens_per_batch', 4096)} rows on each of {world_size} "
            "processes); set one of them, not both (gradient_accumulation_steps=null)")
    train["gradient_accumulation_steps"] = accumulation
    return train


def pretrain(tree: dict) -> dict:
    """Run a recipe tree (see :func:`load_recipe`). Returns the engine's summary."""
    rank, world = rank_and_world()
    train_cfg = TrainConfig.from_dict(resolve_accumulation(tree, world))
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank and on resume
    model = build_model(tree.get("model"))
    data = build_data(tree.get("data"), model.config.vision_config, train_cfg.seed)
    plan = run_plan(data, world, train_cfg)
    for warning in check_plan(plan):
        logger.warning(warning)
    if rank == 0:
        print(plan.describe(), flush=True)
    recon = dict(tree.get("reconstruct") or {})
    num_items, recon_seed = int(recon.get("num_items", 4)), int(recon.get("seed", 0))
    preview = _preview_batch(tree.get("data"), model.config.vision_config, num_items)
    mean, std = image_normalisation()
    data_meta = {k: v for k, v in dict(tree.get("data") or {}).items() if k in
                 ("images", "videos", "resolution", "video_prob", "clip_frames", "frame_stride", "clip_fps")}

    def on_checkpoint(checkpoint_dir, unwrapped):
        # Runs inside the checkpoint's temporary folder: the checkpoint appears with its export or not at all.
        step = int(str(Path(checkpoint_dir).name).split("-")[-1])
        if next(unwrapped.parameters()).dtype != torch.float32:
            # DeepSpeed bf16/fp16 holds the module in low precision; export the fp32 master weights the engine
            # wrote to model.safetensors instead.
            unwrapped = load_mae_checkpoint(checkpoint_dir)[0]
        export_checkpoint(unwrapped, checkpoint_dir, {"step": step, **data_meta})
        if preview is not None:
            grid = save_reconstruction_grid(unwrapped, preview, Path(checkpoint_dir) / "reconstructions.png",
                                            recon_seed, mean, std)
            # a copy that outlives checkpoint rotation (keep_last), for the first-vs-last comparison
            shutil.copyfile(grid, Path(train_cfg.output_dir) / f"reconstructions-step-{step}.png")

    mae_config = model.config
    trainer = Trainer(train_cfg, model, data, flops_per_batch=lambda batch: mae_train_flops(mae_config,
                                                                                              batch["grid_thw"]),
                      on_checkpoint=on_checkpoint, on_device=DeviceNormaliser(mean, std))
    summary = trainer.train()
    out = Path(train_cfg.output_dir)
    grids = {int(p.stem.rsplit("-", 1)[1]): p for p in out.glob("reconstructions-step-*.png")}
    if len(grids) >= 2 and rank_and_world()[0] == 0:  # what pretraining changed: first grid beside the last one
        first, last = min(grids), max(grids)
        summary["reconstructions"] = str(side_by_side([grids[first], grids[last]], [f"step {first}", f"step {last}"],
                                                      out / "reconstructions_first_vs_last.png"))
    return summary


def _preview_batch(data_section: dict | None, vision_config, num_items: int):
    """A fixed, un-augmented batch of the first few images and (if any) one clip, for reconstruction grids."""
    if num_items <= 0:
        return None

    section = dict(data_section or {})
    images, videos = resolve_builtin(section.get("images", "builtin"), section.get("videos"))
    data = data_class(images, videos)(
        images, videos, vision_config=vision_config, resolution=section.get("resolution", 224), augment=False,
        shuffle=False, clip_frames=section.get("clip_frames", 16), frame_stride=section.get("frame_stride", 4),
        clip_fps=section.get("clip_fps"), check_sources=False)
    wanted = []
    if videos:
        wanted.append((VIDEO, 0))
    if images:
        count = min(num_items - len(wanted), len(data.images))
        wanted = [(IMAGE, i) for i in range(count)] + wanted
    rows, grids = [], []
    for kind, index in wanted:
        r, g, _, _ = data.sample(kind, index)
        rows.append(r)
        grids.append(g)
    if not rows:
        return None
    batch = collate_items(rows, grids)
    return {"pixel_values": batch["pixel_values"], "grid_thw": batch["grid_thw"]}


def run(args: argparse.Namespace) -> int:
    def closing(tree: dict, summary: dict) -> str:
        return f"checkpoints, exports and reconstructions are in {tree['train']['output_dir']}/"

    return run_recipe_command(args, load_recipe, pretrain, closing)
