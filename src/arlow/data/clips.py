"""Clips of N frames out of video files, decoded with PyAV.

``clip_indices`` chooses which moments (frame indices on the grid ``time x fps``: a pure function of the video's
length and fps and the random draw);
``read_frames`` decodes exactly those frames, seeking close to the first one so a clip near the end of a long
video does not decode the whole file (video decoding is the usual bottleneck of video MAE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import av
import numpy as np
from PIL import Image

__all__ = ["UnreadableMediaError", "VideoInfo", "probe_video", "clip_indices", "read_frames", "read_clip"]


class UnreadableMediaError(ValueError):
    """A file that cannot be decoded (corrupt, truncated, empty, no video stream ...); the message says why."""


class VideoInfo(tuple):
    """``(num_frames, fps)`` of a video stream, as its container reports them (or estimates from the duration)."""

    __slots__ = ()

    def __new__(cls, num_frames: int, fps: float):
        return super().__new__(cls, (num_frames, fps))

    @property
    def num_frames(self) -> int:
        return self[0]

    @property
    def fps(self) -> float:
        return self[1]


def _stream_info(container, path: str) -> VideoInfo:
    if not container.streams.video:
        raise UnreadableMediaError(f"{path} has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if fps <= 0:
        raise UnreadableMediaError(f"{path}: the video stream reports no frame rate")
    frames = stream.frames
    if frames <= 0:  # some containers (avi, webm) do not store a count: estimate it from the duration
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / av.time_base
        else:
            seconds = 0.0
        frames = int(round(seconds * fps))
    if frames <= 0:
        raise UnreadableMediaError(f"{path}: the video has no frames (or reports neither a count nor a duration)")
    return VideoInfo(frames, fps)


def probe_video(path: str) -> VideoInfo:
    """Frame count and fps of the first video stream of ``path`` (header only, nothing decoded)."""
    with _open(path) as container:
        return _stream_info(container, str(path))


def clip_indices(total_frames: int, video_fps: float, num_frames: int, *, stride: int | None = None,
                 fps: float | None = None, rng: np.random.Generator | None = None) -> list[int]:
    """Indices of ``num_frames`` frames ``stride`` frames apart (or ``1/fps`` seconds apart), at a random start.

    Exactly one of ``stride`` / ``fps`` is given. The start is uniform over the positions where the whole clip
    fits (``rng``), or centred when ``rng`` is None. A video too short for the clip is spread evenly over its
    whole length instead (the step shrinks; with fewer frames than ``num_frames`` some frames repeat), so every
    clip has the same number of frames and the same cost in patches.
    """
    if (stride is None) == (fps is None):
        raise ValueError("give exactly one of stride (frames between samples) or fps (samples per second)")
    if num_frames < 1 or total_frames < 1:
        raise ValueError(f"need num_frames >= 1 and a non-empty video, got {num_frames} of {total_frames}")
    if stride is not None and stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride}")
    if fps is not None and fps <= 0:
        raise ValueError(f"clip fps must be positive, got {fps}")
    step = float(stride) if stride is not None else video_fps / fps
    last = total_frames - 1
    span = step * (num_frames - 1)
    if span > last:
        step = last / (num_frames - 1) if num_frames > 1 else 0.0
        start = 0.0
    elif stride is not None:  # integer start keeps the samples exactly `stride` frames apart
        room = int(last - span)
        start = float(rng.integers(0, room + 1)) if rng is not None else float(room // 2)
    else:
        room = last - span
        start = float(rng.uniform(0.0, room)) if rng is not None else room / 2
    return [min(last, int(math.floor(start + j * step + 0.5))) for j in range(num_frames)]


def read_frames(path: str, indices: Sequence[int], seek: bool = True) -> list[Image.Image]:
    """Decode the frames at ``indices`` (any order, repeats allowed) as RGB PIL images.

    Index ``i`` stands for presentation time ``i / fps`` and is served by the frame on screen at that time (the
    last one starting at or before it): frame ``i`` of a constant-frame-rate video, and the right moment of a
    variable-frame-rate one (sampling keeps real time). If the stream ends a couple of frames early
    (containers often over-count by one or two) the last frame stands in; a stream that ends well before the
    wanted frames is a truncated file and raises ``UnreadableMediaError``. ``seek=False`` decodes from the start
    (for containers whose seeking misbehaves).
    """
    with _open(path) as container:
        return _decode(container, str(path), indices, _stream_info(container, str(path)), seek)


def read_clip(path, num_frames: int, *, stride: int | None = None, fps: float | None = None,
              rng: np.random.Generator | None = None, threads: int = 1, name: str | None = None,
              convert=None, seek_after: float = 2.0) -> tuple[list, list[int]]:
    """``num_frames`` RGB frames of ``path`` (see :func:`clip_indices`) and the source frame indices used.

    ``path`` may be a binary file object (``name`` then names it in errors); ``threads > 1`` lets FFmpeg decode
    with that many threads (frame and slice threading); ``convert(av.VideoFrame)`` makes each wanted frame
    (default: an RGB PIL image); a clip starting more than ``seek_after`` seconds in is reached by seeking to the
    keyframe before it (web video often has keyframes seconds apart, so nearer the start decoding from the first
    frame costs no more; a prepared video has one every second or less).
    """
    name = name or str(path)
    with _open(path) as container:
        info = _stream_info(container, name)
        if threads > 1:
            container.streams.video[0].thread_type = "AUTO"
            container.streams.video[0].codec_context.thread_count = threads
        indices = clip_indices(info.num_frames, info.fps, num_frames, stride=stride, fps=fps, rng=rng)
        return _decode(container, name, indices, info, convert=convert, seek_after=seek_after), indices


def _open(path):
    """``path``: a file name or a binary file object (a prepared shard's member in memory)."""
    try:
        return av.open(path if hasattr(path, "read") else str(path))
    except Exception as error:  # FFmpeg errors, OSError, ...: the file cannot be opened
        raise UnreadableMediaError(f"cannot open video {path}: {type(error).__name__}: {error}") from error


def _decode(container, path: str, indices: Sequence[int], info: VideoInfo, seek: bool = True, convert=None,
            seek_after: float = 2.0) -> list[Image.Image]:
    convert = convert or av.VideoFrame.to_image
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("no frame indices to read")
    stream = container.streams.video[0]
    time_base = float(stream.time_base) if stream.time_base else None
    origin = stream.start_time or 0
    # Index i means presentation time i / fps; it is served by the frame on screen then: the last one that starts at
    # or before it. Constant frame rate: frame i itself. Variable frame rate: the clip keeps its timing.
    times = [i / info.fps for i in wanted]
    tolerance = 0.5 * time_base if time_base else 1e-6  # half a tick: equal times compare equal
    got: dict[int, Image.Image] = {}
    last_index, last_frame = -1, None
    try:
        if seek and time_base and times[0] > seek_after:  # land on the keyframe at or before the first time
            container.seek(origin + int(times[0] / time_base), stream=stream, backward=True, any_frame=False)
        pointer = 0
        for counter, frame in enumerate(container.decode(stream)):
            if frame.pts is not None and time_base:
                time = (frame.pts - origin) * time_base
            else:
                time = counter / info.fps
            if last_frame is not None and times[pointer] < time - tolerance:
                image = convert(last_frame)  # the previous frame was on screen at these times
                while pointer < len(wanted) and times[pointer] < time - tolerance:
                    got[wanted[pointer]] = image
                    pointer += 1
            if pointer == len(wanted):
                break
            last_frame = frame
            last_index = int(math.floor(time * info.fps + 0.5))
    except Exception as error:  # corrupt packets, decoder errors
        raise UnreadableMediaError(f"error decoding video {path}: {type(error).__name__}: {error}") from error
    missing = [i for i in wanted if i not in got]
    if missing:  # times at or after the last frame's start (it stays on screen), or a stream that ended early
        if last_frame is None:
            raise UnreadableMediaError(f"video {path}: no frame could be decoded")
        slack = max(2, int(0.02 * info.num_frames))
        if missing[-1] - last_index > slack:
            raise UnreadableMediaError(
                f"video {path} is truncated: decoding stopped at frame {last_index} but frame {missing[0]} of "
                f"{info.num_frames} (from the header) was needed"
            )
        filler = convert(last_frame)
        for i in missing:
            got[i] = filler
    return [got[int(i)] for i in indices]
