"""Images -> flattened patch rows, the vision encoder's input (design D3). Pillow and numpy only.

Per image: load (path, URL, bytes, array, PIL; see :mod:`arlow.processing.media`) -> RGB with EXIF orientation
-> :func:`smart_resize` to ``(h, w)``, both multiples of ``patch_size * merge_size`` (28) with ``h * w`` within
``[min_pixels, max_pixels]`` and the aspect ratio kept -> ``x / 255`` -> ``(x - mean) / std`` (mean = std = 0.5,
so pixels lie in [-1, 1]) -> ``temporal_patch_size`` identical frames -> :func:`~arlow.processing.patches.patchify`.

Output of a call on ``n`` images:

* ``pixel_values``  ``(sum_i t_i * h_i * w_i, C * Tp * P * P)`` float32 (1176 columns by default): every image's
  rows concatenated, no padding rows, merge-window-major order within an image;
* ``image_grid_thw`` ``(n, 3)`` int64, ``(t, h, w)`` in patch units (``t = 1`` for an image).

Image ``i`` becomes ``t_i * h_i * w_i / merge_size**2`` tokens of the language model.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .media import array_to_image, open_image, to_rgb
from .patches import patchify

__all__ = ["smart_resize", "pixel_bounds", "resize_and_normalize", "ArlowImageProcessor", "ArlowImageProcessorKwargs",
           "MAX_ASPECT_RATIO"]

logger = logging.get_logger(__name__)

MAX_ASPECT_RATIO = 200
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Target ``(h, w)`` for an image of ``height x width``: both multiples of ``factor``, at least ``factor``.

    Each side is rounded to the nearest multiple of ``factor``. If the area then exceeds ``max_pixels`` both sides
    are scaled down by the same factor (floored to multiples); if it falls below ``min_pixels`` they are scaled up
    (ceiled). A very elongated image whose short side is clamped to ``factor`` then has its long side cut so that
    ``h * w <= max_pixels`` still holds: ``max_pixels`` always wins over ``min_pixels`` and over the aspect ratio.

    Raises ``ValueError`` for non-positive sizes, ``min_pixels > max_pixels``, ``max_pixels < factor**2`` (not
    even one merge window fits) and aspect ratios above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels ({max_pixels}) is below {factor}x{factor} = {factor * factor}, the area of a "
                         "single merge window; raise max_pixels")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} has an aspect ratio of {aspect:.1f}, above the limit of "
                         f"{MAX_ASPECT_RATIO}; crop or pad it first")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h * w > max_pixels:  # a side clamped to `factor` (or ceiled up) overshot: shorten the long side
        if h >= w:
            h = max(factor, math.floor(max_pixels / w / factor) * factor)
        else:
            w = max(factor, math.floor(max_pixels / h / factor) * factor)
    return h, w


def pixel_bounds(size) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` from a ``size`` dict: ``{"shortest_edge", "longest_edge"}`` (transformers 5.x and
    Qwen2-VL's convention, which holds pixel *counts* there, not edge lengths) or the older
    ``{"min_pixels", "max_pixels"}``; a ``SizeDict`` reads as the first form."""
    if size is None:
        return None, None
    if isinstance(size, SizeDict):
        return size.shortest_edge, size.longest_edge
    size = dict(size)
    if set(size) <= {"min_pixels", "max_pixels"}:
        return size.get("min_pixels"), size.get("max_pixels")
    if set(size) <= {"shortest_edge", "longest_edge"}:
        return size.get("shortest_edge"), size.get("longest_edge")
    raise ValueError(f"size must be {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}} (pixel counts), got "
                     f"{size}; or pass min_pixels / max_pixels directly")


def resize_and_normalize(image: np.ndarray, height: int, width: int, resample, rescale_factor: float | None,
                         mean, std) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, height, width)``: resized with Pillow, ``* rescale_factor`` (if given),
    then ``(x - mean) / std`` (if ``mean`` is given)."""
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), resample=resample))
    x = image.astype(np.float32)
    if rescale_factor is not None:
        x = x * np.float32(rescale_factor)
    if mean is not None:
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class ArlowImageProcessorKwargs(ImagesKwargs, total=False):
    """Options of :class:`ArlowImageProcessor` beyond transformers' ``ImagesKwargs``.

    min_pixels / max_pixels: bounds on the resized area ``h * w`` (pixels, not edges).
    patch_size, temporal_patch_size, merge_size: the encoder's ``P``, ``Tp`` and ``s``.
    """

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int


class ArlowImageProcessor(PilBackend):
    r"""Image processor of Arlow: aspect-preserving resize to multiples of 28, normalisation, patchification.

    Args (also accepted per call):
        size: bounds on the resized area as ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` (pixel
            counts, transformers 5.x / Qwen2-VL convention; defaults ``56*56`` and ``28*28*1280``, i.e. 4 to 1280
            merged tokens per image). This is the saved setting; the older ``{"min_pixels": a, "max_pixels": b}`` is
            read too.
        min_pixels, max_pixels: the same bounds given one at a time (they override ``size``); also readable and
            settable as attributes.
        do_resize: resize with :func:`smart_resize`; if False every image must already have sides that are
            multiples of ``patch_size * merge_size``.
        resample: Pillow filter (bicubic).
        do_rescale, rescale_factor: multiply by ``1/255``.
        do_normalize, image_mean, image_std: ``(x - mean) / std`` with mean = std = 0.5 (the fork's values).
        do_convert_rgb: convert any mode (grayscale, RGBA/LA on white, palette, 16-bit, CMYK) to RGB; if False an
            image that is not already 3-channel RGB is rejected.
        patch_size, temporal_patch_size, merge_size: must match the vision encoder (14, 2, 2).
    """

    do_resize = True
    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    default_to_square = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    do_convert_rgb = True
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    valid_kwargs = ArlowImageProcessorKwargs
    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, **kwargs):
        # The reference fork's pan-and-scan crops are not implemented: drop its keys rather than keep dead settings.
        if kwargs.pop("do_pan_and_scan", False):
            logger.warning("ArlowImageProcessor: do_pan_and_scan=True (reference fork) is not supported; ignored")
        for key in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate",
                    "max_num_crops"):
            kwargs.pop(key, None)
        kwargs["size"] = self._bounds_to_size(kwargs.pop("size", None), kwargs.pop("min_pixels", None),
                                              kwargs.pop("max_pixels", None), type(self).size)
        super().__init__(**kwargs)

    @staticmethod
    def _bounds_to_size(size, min_pixels, max_pixels, default) -> SizeDict:
        """One ``SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)`` from ``size`` (either spelling) and
        the explicit bounds, which win; what is still missing comes from ``default``."""
        low, high = pixel_bounds(size)
        default_low, default_high = pixel_bounds(default)
        low = min_pixels if min_pixels is not None else low if low is not None else default_low
        high = max_pixels if max_pixels is not None else high if high is not None else default_high
        return SizeDict(shortest_edge=low, longest_edge=high)

    @property
    def min_pixels(self) -> int:
        """Lower bound on the resized area: ``size["shortest_edge"]``."""
        return pixel_bounds(self.size)[0]

    @min_pixels.setter
    def min_pixels(self, value: int | None) -> None:
        if value is not None:
            self.size = self._bounds_to_size(self.size, value, None, type(self).size)

    @property
    def max_pixels(self) -> int:
        """Upper bound on the resized area: ``size["longest_edge"]``."""
        return pixel_bounds(self.size)[1]

    @max_pixels.setter
    def max_pixels(self, value: int | None) -> None:
        if value is not None:
            self.size = self._bounds_to_size(self.size, None, value, type(self).size)

    # -- kwargs: `size` and min/max_pixels are one setting -------------------------------------------------

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        # A call's `size` must beat the instance's min/max_pixels, which transformers fills in for missing kwargs.
        if kwargs.get("size") is not None:
            size = self._bounds_to_size(kwargs.pop("size"), kwargs.get("min_pixels"), kwargs.get("max_pixels"),
                                        self.size)
            kwargs.update(min_pixels=size.shortest_edge, max_pixels=size.longest_edge)
        return super().preprocess(images, *args, **kwargs)

    def _standardize_kwargs(self, min_pixels=None, max_pixels=None, size=None, **kwargs) -> dict:
        size = self._bounds_to_size(size, min_pixels, max_pixels, self.size)
        kwargs = super()._standardize_kwargs(size=size, **kwargs)
        kwargs.update(min_pixels=size.shortest_edge, max_pixels=size.longest_edge)
        return kwargs

    # -- loading -----------------------------------------------------------------------------------------------

    def fetch_images(self, image_url_or_urls):
        """Decode paths / URLs / bytes / data URIs (nested lists kept); images and arrays pass through."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (np.ndarray, torch.Tensor)):
            if image_url_or_urls.ndim == 2:  # grayscale: transformers' batching only knows 3-D images
                return array_to_image(image_url_or_urls)
            return image_url_or_urls
        if isinstance(image_url_or_urls, Image.Image):
            return image_url_or_urls
        return open_image(image_url_or_urls)

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        """One image (PIL, array or tensor) -> uint8 ``(3, H, W)``, upright (EXIF orientation applied)."""
        if not isinstance(image, Image.Image):
            image = array_to_image(image)
        if do_convert_rgb:
            image = to_rgb(image)
        else:
            image = ImageOps.exif_transpose(image)
            if image.mode != "RGB":
                raise ValueError(f"got an image in mode {image.mode} with do_convert_rgb=False; the encoder takes "
                                 "3-channel RGB, so convert it or leave do_convert_rgb=True")
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)

    # -- the pipeline ------------------------------------------------------------------------------------------

    def target_size(self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None,
                    patch_size: int | None = None, merge_size: int | None = None) -> tuple[int, int]:
        """Resized ``(h, w)`` for an image of ``height x width`` under this processor's (or the given) settings."""
        factor = (patch_size or self.patch_size) * (merge_size or self.merge_size)
        return smart_resize(height, width, factor=factor,
                            min_pixels=min_pixels if min_pixels is not None else self.min_pixels,
                            max_pixels=max_pixels if max_pixels is not None else self.max_pixels)

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean, image_std, patch_size: int,
                    temporal_patch_size: int, merge_size: int, min_pixels: int, max_pixels: int,
                    return_tensors=None, **kwargs) -> BatchFeature:
        if len(images) == 0:
            raise ValueError("no images were given")
        factor = patch_size * merge_size
        rows, grids = [], []
        for image in images:
            height, width = image.shape[-2:]
            if do_resize:
                h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            elif height % factor or width % factor:
                raise ValueError(f"image of {height}x{width} is not a multiple of patch_size*merge_size = {factor} "
                                 "on both sides; set do_resize=True or resize it first")
            else:
                h, w = height, width
            pixels = resize_and_normalize(
                np.ascontiguousarray(image.transpose(1, 2, 0)), h, w, resample,
                rescale_factor if do_rescale else None,
                image_mean if do_normalize else None, image_std,
            )
            frames = torch.from_numpy(pixels)[None].expand(temporal_patch_size, -1, -1, -1)  # an image = Tp frames
            item_rows, grid = patchify(frames, patch_size, temporal_patch_size, merge_size)
            rows.append(item_rows)
            grids.append(grid)
        data = {
            "pixel_values": torch.cat(rows).numpy(),
            "image_grid_thw": torch.stack(grids).numpy(),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Patch rows an image of ``height x width`` produces (``/ merge_size**2`` gives its LM tokens)."""
        images_kwargs = dict(images_kwargs or {})
        low, high = pixel_bounds(images_kwargs.pop("size", None))
        patch_size = images_kwargs.get("patch_size") or self.patch_size
        h, w = self.target_size(height, width,
                                min_pixels=images_kwargs.get("min_pixels", low),
                                max_pixels=images_kwargs.get("max_pixels", high),
                                patch_size=patch_size, merge_size=images_kwargs.get("merge_size"))
        return (h // patch_size) * (w // patch_size)

    def get_number_of_image_tokens(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Language-model tokens (placeholders) an image of ``height x width`` becomes."""
        merge_size = (images_kwargs or {}).get("merge_size") or self.merge_size
        return self.get_number_of_image_patches(height, width, images_kwargs) // merge_size**2
