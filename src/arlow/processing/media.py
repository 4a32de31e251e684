"""Load images and videos from wherever users keep them, with errors that say what to fix.

* :func:`load_image` -> an RGB ``PIL.Image`` from a path, ``file://`` or ``http(s)://`` URL, ``data:`` URI or
  bare base64 string, raw bytes, a numpy array / torch tensor, or a PIL image. Network access happens only when
  the caller passes an http(s) URL.
* :func:`load_video` -> ``(frames uint8 (T, H, W, 3), VideoMetadata)`` from a path / URL / bytes (decoded with
  PyAV), a ``(T, H, W, C)`` array or tensor, or a list of frames (PIL images or arrays), with frame sampling by
  count (``num_frames``) or rate (``fps``) and a ``max_frames`` cap (:func:`sample_frame_indices`).

Missing files raise :class:`MediaNotFoundError` (a ``FileNotFoundError``); unreadable, truncated or empty media
raise :class:`MediaDecodeError` (a ``ValueError``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MediaNotFoundError",
    "MediaDecodeError",
    "VideoMetadata",
    "open_image",
    "to_rgb",
    "array_to_image",
    "load_image",
    "sample_frame_indices",
    "load_video",
]

SOURCES_HELP = {
    "image": "a path, a file:// or http(s):// URL, a data: URI, bytes, a numpy array, a torch tensor or a PIL image",
    "video": "a path, a file:// or http(s):// URL, bytes, a (T, H, W, C) array or tensor, or a list of frames",
}
URL_TIMEOUT_S = 30.0


class MediaNotFoundError(FileNotFoundError):
    """A media path that does not exist."""


class MediaDecodeError(ValueError):
    """Media that exists but cannot be decoded: not an image/video, corrupt, truncated, or empty."""


# ----------------------------------------------------------------------------------------------- sources


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _read_source(source, kind: str) -> tuple[object, str]:
    """Resolve a str/Path/bytes source to ``(a path or BytesIO, description for messages)``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), f"the given {kind} bytes"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"cannot load a {kind} from {type(source).__name__}; pass {SOURCES_HELP[kind]}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise MediaDecodeError(f"only base64 data URIs are supported (data:<mime>;base64,<payload>), got "
                                   f"'{header[:40]}'")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True)), f"the {kind} data URI"
        except (binascii.Error, ValueError) as err:
            raise MediaDecodeError(f"the {kind} data URI does not hold valid base64: {err}") from None
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (user asked)
                return io.BytesIO(response.read()), f"'{source}'"
        except OSError as err:
            raise MediaNotFoundError(f"could not download the {kind} at '{source}': {err}") from None
    if source.startswith("file://"):
        source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
    path = Path(source).expanduser()
    try:
        exists = path.is_file()
    except OSError:  # e.g. a name too long to be a path
        exists = False
    if not exists and kind == "image" and len(source) >= 100:
        # Chat messages may carry an image as bare base64 ({"type": "image", "base64": ...}).
        try:
            return io.BytesIO(base64.b64decode(source, validate=True)), "the base64 image"
        except (binascii.Error, ValueError):
            pass
    if not exists:
        what = "is a directory, not a file" if _is_dir(path) else "does not exist"
        shown = source if len(source) <= 200 else source[:200] + "..."
        raise MediaNotFoundError(f"{kind} file '{shown}' {what}; pass {SOURCES_HELP[kind]}")
    return str(path), f"'{source}'"


# ----------------------------------------------------------------------------------------------- images


def open_image(source) -> Image.Image:
    """Decode ``source`` (anything :func:`load_image` takes) to a PIL image in its own mode, fully loaded."""
    if isinstance(source, np.ndarray) or _is_tensor(source):
        return array_to_image(source)
    if isinstance(source, Image.Image):
        image, desc = source, "the given PIL image"
    else:
        handle, desc = _read_source(source, "image")
    try:
        if not isinstance(source, Image.Image):
            image = Image.open(handle)
        image.load()  # PIL decodes lazily: force it, so truncation is caught here and not later
    except UnidentifiedImageError:
        raise MediaDecodeError(f"{desc} is not a readable image (unknown format or corrupt data)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaDecodeError(f"{desc} could not be decoded, it is probably truncated or corrupt ({err})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then converted to 8-bit RGB.

    Transparency (RGBA, LA, PA, palette with a transparent index) is composited on white. 16-bit grayscale
    (``I;16*``) is scaled from [0, 65535]; 32-bit ``I`` is read as 16-bit when any value exceeds 255; float ``F``
    is read as [0, 1] when its maximum is at most 1, else as [0, 255]. CMYK, YCbCr, 1-bit and palette images go
    through Pillow's conversions.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and peak > 255):
            scale = 255.0 / 65535.0
        elif mode == "F" and peak <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = any(band in ("A", "a") for band in image.getbands()) or "transparency" in image.info
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise MediaDecodeError(f"cannot convert an image in mode {mode} to RGB ({err})") from None


def array_to_image(array) -> Image.Image:
    """``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` array/tensor, ``C`` in {1, 3, 4}, to a PIL image.

    uint8 is taken as is, uint16 is scaled from [0, 65535], bool to {0, 255}; floats must lie in [0, 1]
    (scaled by 255) or [0, 255].
    """
    if _is_tensor(array):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; "
                         f"got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 255:
            raise ValueError(f"image values must lie in [0, 1] or [0, 255], got [{low}, {high}]; rescale the "
                             "array or pass uint8")
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) and high <= 1.0 else 1.0
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}; pass uint8, uint16, bool, int or float")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def load_image(source) -> Image.Image:
    """Load ``source`` as an 8-bit RGB PIL image (EXIF-rotated, transparency on white). See the module doc."""
    return to_rgb(open_image(source))


# ----------------------------------------------------------------------------------------------- videos


@dataclass
class VideoMetadata:
    """What was decoded and which frames were kept.

    ``fps`` is the source frame rate (``None`` when unknown, e.g. a bare array); ``total_frames`` the frames the
    source holds; ``frames_indices`` the kept frames (indices into the source) and ``timestamps`` their times in
    seconds from the first frame (empty when the rate is unknown); ``height``/``width`` the decoded frame size.
    """

    total_frames: int
    fps: float | None = None
    duration: float | None = None
    frames_indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    height: int | None = None
    width: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def sample_frame_indices(total_frames: int, source_fps: float | None = None, num_frames: int | None = None,
                         fps: float | None = None, max_frames: int | None = None) -> np.ndarray:
    """Indices of the frames to keep out of ``total_frames``, sorted and distinct.

    * ``num_frames``: that many frames (at most ``total_frames``);
    * ``fps``: ``floor(duration * fps)`` frames (at least 1, at most all), ``duration = total / source_fps``;
    * neither: every frame.

    ``max_frames`` then caps the count. The ``n`` kept frames are the centres of ``n`` equal segments of the clip,
    ``floor((k + 0.5) * total / n)``, so they are evenly spaced in time and keeping all ``total`` frames is the
    identity.
    """
    if total_frames < 1:
        raise MediaDecodeError("the video has no frames")
    if num_frames is not None and fps is not None:
        raise ValueError("pass either num_frames or fps to sample video frames, not both")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        count = min(int(num_frames), total_frames)
    elif fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not source_fps:
            raise ValueError("sampling by fps needs the frame rate of the source; these frames have none. Pass "
                             "num_frames instead, or give their rate as video_metadata={'fps': ...}")
        count = max(1, min(total_frames, math.floor(total_frames * fps / source_fps + 1e-6)))
    else:
        count = total_frames
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        count = min(count, int(max_frames))
    return np.floor((np.arange(count) + 0.5) * total_frames / count).astype(np.int64)


def _frames_from_arrays(video) -> np.ndarray:
    """A ``(T, H, W[, C])`` array/tensor or a list of frames -> uint8 ``(T, H, W, 3)``."""
    if _is_tensor(video):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim not in (3, 4):
            raise ValueError(f"a video array must be (T, H, W, C) or (T, H, W); got shape {tuple(video.shape)}")
        if video.shape[0] == 0:
            raise MediaDecodeError(f"the video has no frames (an array of shape {tuple(video.shape)} was given)")
        if video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3:
            return np.ascontiguousarray(video)
        frames = list(video)
    else:
        frames = list(video)
    if not frames:
        raise MediaDecodeError("the video has no frames (an empty list was given)")
    rgb = [np.asarray(load_image(frame)) for frame in frames]
    if any(frame.shape != rgb[0].shape for frame in rgb):
        raise ValueError(f"all frames of a video must have the same size, got {sorted({f.shape for f in rgb})}")
    return np.stack(rgb)


def _decode_pyav(handle, desc: str, indices_for) -> tuple[np.ndarray, VideoMetadata]:
    """Decode the frames ``indices_for(total_frames, fps)`` selects, in one pass when the container is honest."""
    import av  # imported lazily: only videos given as files need it

    def open_container():
        if isinstance(handle, io.BytesIO):
            handle.seek(0)
        try:
            return av.open(handle)
        except av.error.FFmpegError as err:
            raise MediaDecodeError(f"{desc} is not a readable video (not a video, corrupt, or truncated): "
                                   f"{err}") from None

    def decode(container, stream, wanted: set[int], fps: float | None):
        """Frames and presentation times (seconds after frame 0) of the wanted indices, and how many decoded.

        With a frame rate, index ``i`` is the moment ``i / fps`` and gets the frame on screen then (the last one
        starting at or before it), so variable-frame-rate video is sampled in real time; constant-frame-rate video
        gets frame ``i`` itself. Without one, index ``i`` is the ``i``-th decoded frame."""
        frames, times, seen, start = {}, {}, 0, None
        order = sorted(wanted)
        pointer, previous, previous_time = 0, None, None

        def serve(frame, time, until: float) -> None:
            """Give ``frame`` (starting at ``time``) to the wanted moments before ``until`` seconds."""
            nonlocal pointer
            array = frame.to_ndarray(format="rgb24")
            while pointer < len(order) and order[pointer] / fps < until:
                frames[order[pointer]], times[order[pointer]] = array, time
                pointer += 1

        try:
            for frame in container.decode(stream):
                if seen == 0:
                    start = frame.time
                time = None if frame.time is None or start is None else frame.time - start
                if fps is None or time is None:  # no timing: by decode count
                    if seen in wanted:
                        frames[seen], times[seen] = frame.to_ndarray(format="rgb24"), time
                        pointer += 1
                elif previous is not None and order[pointer] / fps < time - 1e-6:
                    serve(previous, previous_time, time - 1e-6)  # on screen until this frame starts
                previous, previous_time = frame, time
                seen += 1
                if pointer == len(order):
                    break
            else:
                if previous is not None and fps is not None and previous_time is not None:
                    serve(previous, previous_time, previous_time + 1e-6)  # moments at the last frame's start
        except av.error.FFmpegError as err:
            raise MediaDecodeError(f"{desc} could not be decoded past frame {seen}; it is corrupt or truncated "
                                   f"({err})") from None
        return frames, times, seen

    with open_container() as container:
        if not container.streams.video:
            raise MediaDecodeError(f"{desc} has no video stream (an audio-only or truncated file?)")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        total = stream.frames
        if total <= 0:  # the container does not say: count the packets (cheap, no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size)
    if total <= 0:
        raise MediaDecodeError(f"{desc} has no frames")
    indices = indices_for(total, fps)
    with open_container() as container:
        frames, times, seen = decode(container, container.streams.video[0], set(indices.tolist()), fps)
    if len(frames) < len(indices):
        # Fewer frames decode than the container declares: a short count is tolerated, a big one is truncation.
        if seen == 0 or total - seen > max(2, 0.05 * total):
            raise MediaDecodeError(f"{desc} is truncated or corrupt: it declares {total} frames but only {seen} "
                                   "decode")
        total = seen
        indices = indices_for(total, fps)
        with open_container() as container:
            frames, times, seen = decode(container, container.streams.video[0], set(indices.tolist()), fps)
    stack = np.stack([frames[i] for i in indices.tolist()])
    kept = indices.tolist()
    if all(times[i] is not None for i in kept):
        stamps = [float(times[i]) for i in kept]
    else:
        stamps = [i / fps for i in kept] if fps else []
    meta = VideoMetadata(total_frames=int(total), fps=fps, duration=(total / fps) if fps else None,
                         frames_indices=[int(i) for i in kept], timestamps=stamps,
                         height=int(stack.shape[1]), width=int(stack.shape[2]))
    return stack, meta


def load_video(source, num_frames: int | None = None, fps: float | None = None, max_frames: int | None = None,
               source_fps: float | None = None) -> tuple[np.ndarray, VideoMetadata]:
    """Decode and sample a video: ``(frames uint8 (T, H, W, 3), VideoMetadata)``.

    ``source``: a path, ``file://``/``http(s)://`` URL or bytes (decoded with PyAV, the file's own frame rate
    is used), a ``(T, H, W, C)`` / ``(T, H, W)`` array or tensor, or a list of frames (PIL images or arrays).
    ``source_fps`` gives the frame rate of array/list sources (they have none of their own); it is needed to
    sample them by ``fps`` and to give their frames timestamps (without it ``metadata.timestamps`` is empty).
    Sampling: see :func:`sample_frame_indices`.
    """
    def indices_for(total, rate):
        return sample_frame_indices(total, rate, num_frames=num_frames, fps=fps, max_frames=max_frames)

    if isinstance(source, (str, bytes, bytearray, memoryview, os.PathLike)):
        handle, desc = _read_source(source, "video")
        return _decode_pyav(handle, desc, indices_for)
    if isinstance(source, (np.ndarray, list, tuple)) or _is_tensor(source):
        all_frames = _frames_from_arrays(source)
        total = all_frames.shape[0]
        indices = indices_for(total, source_fps)
        stamps = [i / source_fps for i in indices.tolist()] if source_fps else []
        meta = VideoMetadata(total_frames=total, fps=source_fps, duration=(total / source_fps) if source_fps else None,
                             frames_indices=[int(i) for i in indices], timestamps=stamps,
                             height=int(all_frames.shape[1]), width=int(all_frames.shape[2]))
        return all_frames[indices], meta
    raise TypeError(f"cannot load a video from {type(source).__name__}; pass a path, URL, bytes, a (T, H, W, C) "
                    "array or tensor, or a list of frames")
