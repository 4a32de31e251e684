"""Videos -> flattened patch rows, the same format as images (design D3). PyAV, Pillow and numpy only.

transformers' ``BaseVideoProcessor`` needs torchvision, which this project never requires, so
:class:`ArlowVideoProcessor` is a plain class with ``to_dict`` / ``save_pretrained`` / ``from_pretrained``.

Per video: load and sample frames (:func:`arlow.processing.media.load_video`: by ``num_frames`` or by ``fps``
using the file's own frame rate, at most ``max_frames``) -> pad to a multiple of ``temporal_patch_size`` by
repeating the last frame (odd counts and single frames work) -> resize every frame to the :func:`smart_resize`
target of the frame size (``min_pixels``/``max_pixels`` bound each frame's area) -> ``x / 255`` ->
``(x - 0.5) / 0.5`` -> :func:`~arlow.processing.patches.patchify`.

Output of a call on ``n`` videos:

* ``pixel_values_videos`` ``(sum_i t_i * h_i * w_i, C * Tp * P * P)`` float32, concatenated, no padding rows;
* ``video_grid_thw`` ``(n, 3)`` int64 in patch units, exactly like ``image_grid_thw``
  (``t = ceil(frames / Tp)``);
* ``second_per_grid_ts`` ``(n,)`` float32: seconds spanned by one temporal patch, i.e. ``Tp`` times the mean
  spacing of the sampled frames' timestamps (``Tp / fps`` of the source for a one-frame clip).

Video ``i`` becomes ``t_i * h_i * w_i / merge_size**2`` tokens of the language model.
"""

import copy
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import VideosKwargs
from transformers.utils import logging

from .image import pixel_bounds, resize_and_normalize, smart_resize
from .media import VideoMetadata, load_video
from .patches import pad_frames, patchify

__all__ = ["ArlowVideoProcessor", "ArlowVideosKwargs", "flatten_videos", "ASSUMED_FPS", "VIDEO_CONFIG_NAME"]

logger = logging.get_logger(__name__)

VIDEO_CONFIG_NAME = "video_preprocessor_config.json"
# Frame rate assumed for frames given without one (an array or a list of images and no video_metadata):
# Qwen2-VL's default sampling rate, so such frames are read as already sampled at 2 frames per second.
ASSUMED_FPS = 2.0


class ArlowVideosKwargs(VideosKwargs, total=False):
    """Per-call video options on top of transformers' ``VideosKwargs`` (``num_frames``, ``fps``,
    ``do_sample_frames``, ``video_metadata``, ``return_metadata`` ...)."""

    min_pixels: int
    max_pixels: int
    max_frames: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int


def _is_frame(x) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def flatten_videos(videos) -> list:
    """A video or a (nested) list of videos -> a flat list of videos.

    A video is a path/URL/bytes, a ``(T, H, W[, C])`` array or tensor, or a list of frames (PIL images or 2-D/3-D
    arrays). A 5-D array is a batch of videos; any other list is a list of videos (nesting per sample allowed).
    """
    if videos is None:
        return []
    if isinstance(videos, (str, bytes, bytearray, os.PathLike)):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 5:
            return list(videos)
        if videos.ndim in (3, 4):
            return [videos]
        raise ValueError(f"a video array must be (T, H, W, C), (T, H, W) or a (B, T, H, W, C) batch; got shape "
                         f"{tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(frame) for frame in videos):
            return [list(videos)]
        return [video for item in videos for video in flatten_videos(item)]
    raise TypeError(f"cannot read a video from {type(videos).__name__}")


class ArlowVideoProcessor:
    r"""Video processor of Arlow: frame sampling, temporal padding, per-frame resize, normalisation, patchify.

    Args (also accepted per call):
        num_frames: sample this many frames, evenly spaced (``None``: see ``fps``).
        fps: sample this many frames per second of video, using the file's own frame rate (``None`` with
            ``num_frames=None``: keep every frame).
        max_frames: never keep more frames than this (64).
        do_sample_frames: if False every decoded frame is kept (no ``num_frames``/``fps``/``max_frames``).
        min_pixels, max_pixels: bounds on each frame's resized area (defaults ``128*28*28`` and ``768*28*28``).
        do_resize, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std: as for images.
        patch_size, temporal_patch_size, merge_size: must match the vision encoder (14, 2, 2).

    Call-only: ``video_metadata`` (a dict such as ``{"fps": 30}``, or one per video) gives the frame rate of
    frames passed as arrays/images; without it they are taken to be sampled at ``ASSUMED_FPS`` (2) frames per
    second. ``return_metadata=True`` adds ``video_metadata`` (one :class:`VideoMetadata` per video).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw", "second_per_grid_ts"]
    valid_kwargs = ArlowVideosKwargs
    _auto_class = None  # read by ProcessorMixin.save_pretrained for every sub-processor (custom-code export)
    # Keys written by transformers' video processors or the reference fork that carry no setting here.
    _ignored_keys = {"video_processor_type", "processor_class", "size", "default_to_square", "do_convert_rgb",
                     "sample_strategy", "motion_threshold", "min_frames", "do_pad", "do_center_crop", "crop_size",
                     "return_metadata", "max_tokens_per_video"}

    def __init__(self, num_frames: int | None = None, fps: float | None = None, max_frames: int | None = 64,
                 do_sample_frames: bool = True, min_pixels: int | None = None, max_pixels: int | None = None,
                 do_resize: bool = True, resample: int = PILImageResampling.BICUBIC, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2, **kwargs):
        low, high = pixel_bounds(kwargs.get("size"))  # the fork saved per-frame bounds as `size`
        unknown = sorted(set(kwargs) - self._ignored_keys)
        if unknown:
            raise TypeError(f"ArlowVideoProcessor got unknown settings {unknown}")
        self.num_frames = num_frames
        self.fps = fps
        self.max_frames = max_frames
        self.do_sample_frames = do_sample_frames
        self.min_pixels = min_pixels if min_pixels is not None else (low or 128 * 28 * 28)
        self.max_pixels = max_pixels if max_pixels is not None else (high or 768 * 28 * 28)
        self.do_resize = do_resize
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self._check(self.to_dict())

    # -- settings --------------------------------------------------------------------------------------------

    @classmethod
    def setting_names(cls) -> set[str]:
        """The keyword settings the constructor takes (``size`` included)."""
        return {name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")} \
            | {"size"}

    @property
    def size(self) -> dict:
        """The per-frame area bounds in transformers' spelling (as Qwen2-VL's video processor):
        ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}``."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @size.setter
    def size(self, value) -> None:
        low, high = pixel_bounds(value)
        self.min_pixels = low if low is not None else self.min_pixels
        self.max_pixels = high if high is not None else self.max_pixels

    def to_dict(self) -> dict:
        """JSON-able settings; ``ArlowVideoProcessor(**d)`` rebuilds the processor."""
        out = {key: copy.deepcopy(value) for key, value in vars(self).items() if not key.startswith("_")}
        out["video_processor_type"] = type(self).__name__
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory) -> str:
        """Write ``video_preprocessor_config.json`` into ``save_directory``; returns the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, VIDEO_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        return path

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Settings dict + keyword overrides -> processor, as transformers' ``from_dict`` (what ``AutoVideoProcessor``
        calls where torchvision is installed). ``return_unused_kwargs=True`` also returns the keyword arguments that
        are no video setting."""
        return_unused = kwargs.pop("return_unused_kwargs", False)
        names = cls.setting_names()
        used = {key: value for key, value in kwargs.items() if key in names}
        unused = {key: value for key, value in kwargs.items() if key not in names}
        processor = cls(**{**config_dict, **used})
        return (processor, unused) if return_unused else processor

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "ArlowVideoProcessor":
        """From a folder holding ``video_preprocessor_config.json`` (or a processor's ``processor_config.json``
        with a ``video_processor`` entry), or from such a file. ``overrides`` replace saved settings."""
        hub_keys = {"cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
                    "trust_remote_code", "proxies", "_from_auto", "_from_pipeline"}
        overrides = {key: value for key, value in overrides.items() if key not in hub_keys}
        path = Path(path)
        candidates = [path] if path.is_file() else [path / VIDEO_CONFIG_NAME, path / "processor_config.json"]
        for candidate in candidates:
            if candidate.is_file():
                settings = json.loads(candidate.read_text(encoding="utf-8"))
                if candidate.name == "processor_config.json":  # "video_config": folders saved before 2026-12
                    settings = settings.get("video_processor", settings.get("video_config", settings))
                return cls(**{**settings, **overrides})
        raise FileNotFoundError(f"no {VIDEO_CONFIG_NAME} (or processor_config.json) in '{path}'; save one with "
                                "ArlowVideoProcessor.save_pretrained")

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other) -> bool:
        return isinstance(other, ArlowVideoProcessor) and self.to_dict() == other.to_dict()

    @staticmethod
    def _check(s: dict) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if not isinstance(s[name], (int, np.integer)) or s[name] < 1:
                raise ValueError(f"video {name} must be a positive integer, got {s[name]!r}")
        for name in ("num_frames", "max_frames"):
            if s[name] is not None and s[name] < 1:
                raise ValueError(f"video {name} must be >= 1 or None, got {s[name]}")
        if s["fps"] is not None and s["fps"] <= 0:
            raise ValueError(f"video fps must be positive or None, got {s['fps']}")
        if s["num_frames"] is not None and s["fps"] is not None:
            raise ValueError("set either num_frames or fps for video sampling, not both")
        if s["min_pixels"] > s["max_pixels"]:
            raise ValueError(f"video min_pixels ({s['min_pixels']}) must not exceed max_pixels ({s['max_pixels']})")

    # -- the pipeline ------------------------------------------------------------------------------------------

    def __call__(self, videos, return_tensors=None, video_metadata=None, return_metadata: bool = False,
                 **kwargs) -> BatchFeature:
        """Process a video or a list of videos; ``kwargs`` override the settings for this call only."""
        transformers_only = {"do_convert_rgb", "size", "default_to_square", "do_center_crop", "crop_size", "do_pad",
                             "data_format", "input_data_format", "device"}
        low, high = pixel_bounds(kwargs.pop("size", None))
        settings = self.to_dict()
        settings.update({"min_pixels": low or settings["min_pixels"], "max_pixels": high or settings["max_pixels"]})
        for key, value in kwargs.items():
            if key in settings:
                if value is not None or key in ("num_frames", "fps", "max_frames"):
                    settings[key] = value
            elif key not in transformers_only:
                raise TypeError(f"unknown video processing option '{key}'")
        if kwargs.get("num_frames") is not None and "fps" not in kwargs:
            settings["fps"] = None  # a per-call frame count replaces a default rate (and vice versa)
        if kwargs.get("fps") is not None and "num_frames" not in kwargs:
            settings["num_frames"] = None
        self._check(settings)
        items = flatten_videos(videos)
        if not items:
            raise ValueError("no videos were given")
        metadata = video_metadata if isinstance(video_metadata, (list, tuple)) else [video_metadata] * len(items)
        if len(metadata) != len(items):
            raise ValueError(f"got {len(metadata)} video_metadata entries for {len(items)} videos")
        rows, grids, seconds, metas = [], [], [], []
        for video, meta in zip(items, metadata):
            item_rows, grid, spg, meta = self._process_one(video, meta, settings)
            rows.append(item_rows)
            grids.append(grid)
            seconds.append(spg)
            metas.append(meta)
        data = {
            "pixel_values_videos": torch.cat(rows).numpy(),
            "video_grid_thw": torch.stack(grids).numpy(),
            "second_per_grid_ts": np.asarray(seconds, dtype=np.float32),
        }
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if return_metadata:
            out["video_metadata"] = metas
        return out

    def _process_one(self, video, meta, s: dict):
        source_fps = None
        if meta is not None:
            source_fps = meta.fps if isinstance(meta, VideoMetadata) else dict(meta).get("fps")
        if s["do_sample_frames"]:
            frames, info = load_video(video, num_frames=s["num_frames"], fps=s["fps"], max_frames=s["max_frames"],
                                      source_fps=source_fps)
        else:
            frames, info = load_video(video, source_fps=source_fps)
        Tp, P, m = s["temporal_patch_size"], s["patch_size"], s["merge_size"]
        height, width = frames.shape[1:3]
        factor = P * m
        if s["do_resize"]:
            h, w = smart_resize(height, width, factor=factor, min_pixels=s["min_pixels"], max_pixels=s["max_pixels"])
        elif height % factor or width % factor:
            raise ValueError(f"video frames of {height}x{width} are not a multiple of patch_size*merge_size = "
                             f"{factor} on both sides; set do_resize=True or resize them first")
        else:
            h, w = height, width
        pixels = np.stack([
            resize_and_normalize(frame, h, w, s["resample"], s["rescale_factor"] if s["do_rescale"] else None,
                                 s["image_mean"] if s["do_normalize"] else None, s["image_std"])
            for frame in frames
        ])
        clip = pad_frames(torch.from_numpy(pixels), Tp)  # repeat the last frame up to a multiple of Tp
        item_rows, grid = patchify(clip, P, Tp, m)
        return item_rows, grid, self._seconds_per_grid(info, Tp), info

    @staticmethod
    def _seconds_per_grid(info: VideoMetadata, temporal_patch_size: int) -> float:
        """``Tp`` x the mean spacing of the kept frames' timestamps (``Tp / fps`` for a single frame)."""
        stamps = info.timestamps
        if len(stamps) >= 2 and stamps[-1] > stamps[0]:
            return temporal_patch_size * (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        fps = info.fps or ASSUMED_FPS
        if not stamps:  # frames without a rate: one frame every 1/ASSUMED_FPS s
            if info.fps is None:
                logger.warning_once(f"video frames were given without a frame rate; assuming {ASSUMED_FPS} frames "
                                    "per second for second_per_grid_ts (pass video_metadata={'fps': ...})")
            if len(info.frames_indices) >= 2:
                first, last = info.frames_indices[0], info.frames_indices[-1]
                return temporal_patch_size * (last - first) / fps / (len(info.frames_indices) - 1)
        return temporal_patch_size / fps

    def get_number_of_video_patches(self, num_frames: int, height: int, width: int,
                                    videos_kwargs: dict | None = None) -> int:
        """Patch rows a clip of ``num_frames`` (already sampled) frames of ``height x width`` produces."""
        s = {**self.to_dict(), **(videos_kwargs or {})}
        h, w = smart_resize(height, width, factor=s["patch_size"] * s["merge_size"],
                            min_pixels=s["min_pixels"], max_pixels=s["max_pixels"])
        t = -(-num_frames // s["temporal_patch_size"])
        return t * (h // s["patch_size"]) * (w // s["patch_size"])
