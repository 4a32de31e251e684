"""Frozen features of a vision encoder: which encoder (:func:`load_encoder`, :func:`random_encoder`) and what it
sees (:func:`extract_features`).

An image is shown to the encoder exactly as the pretraining pipeline shows an un-augmented image: the largest
centred square, resized (bicubic) to ``resolution x resolution``, rescaled to [0, 1], normalised with the image
processor's mean/std (0.5 / 0.5), repeated to the temporal patch size and patchified in merge-window order. Its
feature is one of :data:`FEATURES` (:func:`pooled_features`); the default (:func:`default_feature`) is
``"deepstack"`` (the mean merged output token followed by each DeepStack level's mean) for an encoder with DeepStack
levels, else ``"merged"``: in the issue-13 measurements the DeepStack levels held the best frozen feature of an
MAE-pretrained encoder (docs/evaluation.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..configuration import ArlowVisionConfig
from ..data.augment import center_crop_box, crop_frames, frames_to_tensor, image_normalisation
from ..data.clips import UnreadableMediaError
from ..modeling.vision import ArlowVLVisionModel
from ..pretrain.run import build_model, load_recipe
from ..processing.patches import pad_frames, patchify
from .datasets import LabelledImages

__all__ = ["load_encoder", "random_encoder", "image_rows", "batch_rows", "pixel_rows", "pooled_features", "image_pixels",
           "extract_features", "Features", "FEATURES", "DEFAULT_FEATURE", "default_feature"]

FEATURES = ("merged", "deepstack", "blocks")
DEFAULT_FEATURE = "deepstack"  # where the encoder has DeepStack levels; see default_feature


def default_feature(config: ArlowVisionConfig) -> str:
    """The default pooled feature of an encoder: ``"deepstack"`` where it has DeepStack levels, else ``"merged"``."""
    return DEFAULT_FEATURE if config.deepstack_visual_indexes else "merged"

logger = logging.getLogger("arlow.evaluation")


def load_encoder(path) -> tuple[ArlowVLVisionModel, str]:
    """An exported encoder, in eval mode, and the folder it came from.

    ``path`` may be an encoder folder (``config.json`` with ``model_type: arlow_vision`` + weights, as written by
    ``ArlowVLVisionModel.save_pretrained``) or a pretraining checkpoint ``checkpoint-N/`` (its ``vision_encoder/``).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"encoder {path} is not a directory: give an exported vision_encoder/ folder, a pretraining "
                         f"checkpoint-N/ folder, or use --random-init")
    folder = path / "vision_encoder" if (path / "vision_encoder" / "config.json").is_file() else path
    config_file = folder / "config.json"
    model_type = None
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            model_type = "<unreadable config.json>"
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if model_type != ArlowVisionConfig.model_type or not weights:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ValueError(
            f"{path} is not a vision encoder: expected a folder with config.json (model_type "
            f"'{ArlowVisionConfig.model_type}') and model.safetensors, as in an export's vision_encoder/, or a "
            f"pretraining checkpoint-N/ that contains vision_encoder/ (found model_type {model_type!r}, files {found})"
        )
    return ArlowVLVisionModel.from_pretrained(folder).eval(), str(folder)


def random_encoder(spec, seed: int = 0) -> tuple[ArlowVLVisionModel, str]:
    """A randomly initialised encoder (eval mode) of the architecture ``spec`` names, and a description.

    ``spec``: a JSON config file (an ``arlow_vision`` config, or an ``arlow`` / ``arlow_mae`` config whose
    ``vision_config`` is used) or a pretraining recipe (a shipped name such as ``tiny_demo``, or a YAML file).
    For a recipe the whole MAE model is built after ``torch.manual_seed(seed)``, exactly as ``arlow pretrain``
    builds it, so with ``seed`` = the recipe's ``train.seed`` this is the run's encoder before its first step.
    The global RNG state is restored afterwards.
    """
    text = str(spec)
    state = torch.random.get_rng_state()
    try:
        if text.endswith(".json"):
            if not Path(text).is_file():
                raise ValueError(f"random-init config {text} does not exist")
            values = json.loads(Path(text).read_text())
            if values.get("model_type") in ("arlow", "arlow_mae") or "vision_config" in values:
                values = dict(values.get("vision_config") or {})
            values.pop("model_type", None)
            config = ArlowVisionConfig.from_dict(values)
            torch.manual_seed(seed)
            encoder = ArlowVLVisionModel(config)
        else:
            tree = load_recipe(text)
            torch.manual_seed(seed)
            encoder = build_model(tree.get("model")).encoder
    finally:
        torch.random.set_rng_state(state)
    return encoder.eval(), f"random init of {text} (seed {seed})"


def image_rows(image, config: ArlowVisionConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One RGB PIL image -> ``(rows (t*h*w, C*Tp*P*P), grid (3,))`` as the un-augmented pretraining view."""
    mean, std = image_normalisation()
    frames = crop_frames([image], center_crop_box(*image.size), resolution, flip=False)
    pixels = frames_to_tensor(frames, mean, std)  # (1, 3, R, R)
    return patchify(pad_frames(pixels, config.temporal_patch_size), config.patch_size, config.temporal_patch_size,
                    config.spatial_merge_size)


def batch_rows(images, config: ArlowVisionConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Many RGB PIL images -> ``(rows (n*h*w, C*Tp*P*P), grid_thw (n, 3))``, equal to concatenating
    :func:`image_rows` of each image, with a handful of tensor operations for the whole batch."""
    mean, std = image_normalisation()
    frames = [crop_frames([image], center_crop_box(*image.size), resolution, flip=False)[0] for image in images]
    return pixel_rows(frames_to_tensor(frames, mean, std), config)


def pixel_rows(pixels: torch.Tensor, config: ArlowVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images ``(n, 3, R, R)`` -> ``(rows (n*h*w, C*Tp*P*P), grid_thw (n, 3))``.

    Why one patchify call is enough: patch rows are ordered time-major, so patchifying the clip of ``n * Tp`` frames
    in which each image is repeated ``Tp`` times yields the images' rows one after the other (temporal patch
    ``i`` = image ``i``).
    """
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be (n, C, H, W), got {tuple(pixels.shape)}")
    tp = config.temporal_patch_size
    rows, grid = patchify(pixels.repeat_interleave(tp, dim=0), config.patch_size, tp, config.spatial_merge_size)
    grid_thw = torch.tensor([[1, int(grid[1]), int(grid[2])]] * pixels.shape[0], dtype=torch.long)
    return rows, grid_thw


def pooled_features(encoder: ArlowVLVisionModel, pixels: torch.Tensor, feature: str | None = None) -> torch.Tensor:
    """Normalised images ``(n, 3, R, R)`` -> one feature per image ``(n, D)`` (differentiable; see :data:`FEATURES`;
    ``None``: :func:`default_feature`).

    ``"merged"``: mean of the merged output tokens ``(hidden_size,)``; ``"deepstack"``: that, then the mean of
    each DeepStack level ``(hidden_size * (1 + levels),)``; ``"blocks"``: the mean over patches of the last
    block's output, before the merger ``(embed_dim,)``.
    """
    config = encoder.config
    feature = default_feature(config) if feature is None else feature
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    if feature == "deepstack" and not config.deepstack_visual_indexes:
        raise ValueError("feature 'deepstack' but this encoder has no DeepStack levels (deepstack_visual_indexes "
                         "is empty); use 'merged' or 'blocks'")
    n = pixels.shape[0]
    rows, grids = pixel_rows(pixels, config)
    param = next(encoder.parameters())
    out = encoder(pixel_values=rows.to(device=param.device, dtype=encoder.get_dtype()), grid_thw=grids,
                  output_hidden_states=feature == "blocks")
    if feature == "blocks":
        levels = [out.hidden_states[-1]]
    else:
        levels = [out.last_hidden_state] + (list(out.deepstack_features) if feature == "deepstack" else [])
    # every image has the same grid, so its tokens are one contiguous, equal-length run
    return torch.cat([level.float().view(n, -1, level.shape[-1]).mean(dim=1) for level in levels], dim=1)


def image_pixels(images: LabelledImages, resolution: int) -> torch.Tensor:
    """Every image of ``images`` as the encoder sees it (see the module docstring): ``(n, 3, R, R)`` normalised.
    Unreadable images raise (``extract_features`` has already skipped them when its ``kept`` selection is used)."""
    mean, std = image_normalisation()
    frames = []
    for index in images.indices:
        image = images.source.load(int(index))
        frames.append(crop_frames([image], center_crop_box(*image.size), resolution, flip=False)[0])
    return frames_to_tensor(frames, mean, std)


@dataclass
class Features:
    """``features (n_kept, D)`` float32 for the readable items at ``kept`` (positions in the dataset);
    ``skipped``: ``(name, reason)`` of the unreadable ones."""

    features: torch.Tensor
    kept: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


def check_resolution(resolution: int, config: ArlowVisionConfig) -> None:
    factor = config.patch_size * config.spatial_merge_size
    if resolution < factor or resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise ValueError(f"resolution must be a positive multiple of patch_size*spatial_merge_size = {factor}; got "
                         f"{resolution}, try {lower} or {lower + factor}")


@torch.no_grad()
def extract_features(encoder: ArlowVLVisionModel, images: LabelledImages, resolution: int, batch_size: int = 64,
                     feature: str | None = None, progress: bool = True, desc: str = "features") -> Features:
    """The ``feature`` (:func:`pooled_features`; ``None``: :func:`default_feature`) of every readable image,
    ``batch_size`` images per encoder call.
    Unreadable images are skipped, counted and logged; ``ValueError`` if none is readable."""
    config = encoder.config
    check_resolution(resolution, config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    feature = default_feature(config) if feature is None else feature
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")
    chunks, kept, skipped, pending = [], [], [], []

    def flush():
        mean, std = image_normalisation()
        frames = [crop_frames([im], center_crop_box(*im.size), resolution, flip=False)[0] for im in pending]
        chunks.append(pooled_features(encoder, frames_to_tensor(frames, mean, std), feature))
        pending.clear()

    bar = tqdm(range(len(images)), desc=desc, unit="img", disable=not progress, leave=False)
    for position in bar:
        index = int(images.indices[position])
        try:
            pending.append(images.source.load(index))
        except UnreadableMediaError as error:
            skipped.append((images.source.name(index), str(error)))
            bar.set_postfix(skipped=len(skipped))
            continue
        kept.append(position)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    if skipped:
        logger.warning("%s: skipped %d unreadable image(s) of %d (first: %s: %s)", images.where, len(skipped),
                       len(images), skipped[0][0], skipped[0][1])
    if not kept:
        shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
        raise ValueError(f"{images.where}: none of the {len(images)} images could be read ({shown})")
    return Features(torch.cat(chunks), np.asarray(kept, dtype=np.int64), skipped)
