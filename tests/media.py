"""Test media made on the fly: images in every Pillow mode and short videos written with PyAV."""

import io
from pathlib import Path

import av
import numpy as np
from PIL import Image


def level_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``; frame ``i`` is a flat gray of level ``10 + 20 * i`` (so it survives compression
    and :func:`frame_index` can tell which frame a decoded one was)."""
    levels = 10 + 20 * np.arange(num_frames)
    if levels.max() > 250:
        raise ValueError("at most 13 distinguishable frames")
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).astype(np.uint8).copy()


def frame_index(frame: np.ndarray) -> int:
    """Index of a (decoded) :func:`level_frames` frame."""
    return int(round((float(np.mean(frame)) - 10) / 20))


def write_video(path, frames: np.ndarray, fps: int = 10, codec: str = "mpeg4", options: dict | None = None) -> Path:
    """Encode uint8 ``(T, H, W, 3)`` frames to ``path`` (the container follows the suffix). ``T = 0`` writes a
    video stream without frames (use an .avi: mp4 drops an empty stream)."""
    path = Path(path)
    height, width = (frames.shape[1:3] if len(frames) else (48, 64))
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        if len(frames) == 0:
            container.start_encoding()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_vfr_video(path, frames: np.ndarray, starts_ms: list[int]) -> str:
    """Encode uint8 ``(T, H, W, 3)`` frames losslessly (H.264, crf 0) as a variable-frame-rate video: frame ``k``
    starts at ``starts_ms[k]`` milliseconds."""
    import fractions

    tick = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "0", "preset": "ultrafast"}
        stream.codec_context.time_base = stream.time_base = tick
        for array, start in zip(frames, starts_ms):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = start, tick
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kwargs)
    return buffer.getvalue()


def with_exif_orientation(image: Image.Image, orientation: int) -> bytes:
    """PNG bytes of ``image`` tagged with an EXIF orientation (6 = displayed rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_bytes(image, exif=exif)
