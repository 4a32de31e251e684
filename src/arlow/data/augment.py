"""MAE augmentations on PIL frames: random resized crop + horizontal flip, one draw per sample.

A clip gets the same crop box and flip in every frame, so motion is not confused with augmentation jitter.
Randomness comes only from the ``numpy.random.Generator`` passed in (seeded per sample by the pipeline), so a
sample looks the same whichever worker process makes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..processing.image import ArlowImageProcessor

__all__ = ["random_resized_crop_box", "center_crop_box", "crop_frames", "frames_to_tensor", "image_normalisation"]

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A box covering ``scale`` of the area with aspect ``w/h`` log-uniform in ``ratio`` (MAE's crop).

    Ten tries to fit such a box; otherwise the largest central box whose aspect is clamped into ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> Box:
    """The largest central square: the evaluation view (resize shorter side, centre crop)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_frames(frames: Sequence[Image.Image], box: Box, size: int, flip: bool) -> list[Image.Image]:
    """Crop ``box`` out of every frame, resize it to ``size x size`` (bicubic), flip left-right if asked.

    An unaugmented frame that already is ``size x size`` passes through unchanged (no resampling).
    """
    out = []
    for frame in frames:
        if box == (0, 0, size, size) and frame.size == (size, size):
            image = frame.copy()
        else:
            image = frame.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(image)
    return out


def frames_to_tensor(frames: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL frames -> ``(T, 3, H, W)`` float32, rescaled to [0, 1] then normalised per channel."""
    array = np.stack([np.asarray(frame, dtype=np.uint8) for frame in frames])  # (T, H, W, 3)
    x = torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def image_normalisation() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel applied after rescaling to [0, 1]: ``ArlowImageProcessor``'s defaults, so
    the encoder is pretrained on exactly the pixels the exported processor will give it."""
    return tuple(ArlowImageProcessor.image_mean), tuple(ArlowImageProcessor.image_std)
