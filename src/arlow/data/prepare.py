"""``arlow prepare-data``: turn the sources ``arlow pretrain`` accepts into prepared shards (:mod:`arlow.data.shards`).

Images are resized so their short side is what the recipe's crops need (never enlarged; ``max_side`` caps the long
side) and stored as JPEG - a JPEG that needs no resizing is stored byte for byte. Videos are re-encoded with PyAV
(H.264) to a short side of 256-320 px and a chosen frame rate, with a keyframe at least every
``keyframe_interval`` seconds, so a clip decodes from a keyframe at most that far before it. Every file is decoded
once here, so an unreadable one is skipped and reported now rather than during training.

Items are shuffled (seeded) before they are dealt to shards, so a shard is a random sample of the source (an
ImageNet folder is sorted by class). The assignment is saved in ``plan.json`` before the first shard is written;
shards are written by worker processes to a temporary name and renamed when complete, so an interrupted run that
is started again keeps every finished shard and writes only the rest.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import multiprocessing
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .clips import UnreadableMediaError, _open, _stream_info
from .sources import ImageList, TarShards, builtin_media, image_source, video_source
from .shards import FORMAT, MANIFEST, VERSION, shard_index_name

__all__ = ["ImageSettings", "VideoSettings", "prepare_images", "prepare_videos", "default_short_side",
           "parse_size", "run"]

logger = logging.getLogger("arlow.data.prepare")
PLAN = "plan.json"


@dataclass
class ImageSettings:
    """How images are stored. ``short_side``: target short side in px (never enlarged); ``max_side``: cap on the
    long side (``None``: no cap); ``quality``: JPEG quality of re-encoded images."""

    short_side: int
    max_side: int | None = None
    quality: int = 90


@dataclass
class VideoSettings:
    """How videos are re-encoded: short side in px (256-320 suits 224-px crops; never enlarged); frame rate:
    ``fps``, or else the source's divided by ``frame_step`` (keep every ``frame_step``-th frame: with the recipe's
    ``frame_stride`` as step a clip decodes only the frames it uses), at most ``max_fps``; a keyframe at least
    every ``keyframe_interval`` seconds; x264 ``crf``/``preset``/``tune`` (``"fastdecode"``, the default: no
    CABAC or deblocking, the fastest to decode in ``benchmarks/bench_data.py``, files ~10% larger; ``None``)."""

    short_side: int = 256
    fps: float | None = None
    frame_step: int = 1
    max_fps: float = 30.0
    keyframe_interval: float = 1.0
    crf: int = 23
    preset: str = "veryfast"
    tune: str | None = "fastdecode"


@dataclass
class Summary:
    """What a preparation did (the command prints it)."""

    kind: str
    files_in: int = 0
    written: int = 0
    bytes: int = 0
    shards: int = 0
    shards_kept: int = 0
    skipped: list = field(default_factory=list)  # [name, reason]
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"{self.kind}s: {self.files_in} files in, {self.written} written, {len(self.skipped)} skipped, "
               f"{self.bytes / 1e6:.1f} MB in {self.shards} shards ({self.shards_kept} kept from an earlier run), "
               f"{self.seconds:.1f} s"]
        reasons = Counter(_reason_kind(reason) for _, reason in self.skipped)
        for reason, count in reasons.most_common():
            out.append(f"  skipped {count}: {reason}")
        for name, reason in self.skipped[:10]:
            out.append(f"    {name}: {reason}")
        if len(self.skipped) > 10:
            out.append(f"    ... {len(self.skipped) - 10} more (listed in each shard's .json under 'skipped')")
        return out


def _reason_kind(reason: str) -> str:
    """A reason without the file name, to count reasons (``cannot decode image x.jpg: ...`` -> ``cannot decode``)."""
    for phrase in ("is empty", "does not exist", "cannot decode", "cannot open", "truncated", "no video stream",
                   "no frames", "no frame", "error decoding", "no frame rate", "holds no image"):
        if phrase in reason:
            return phrase
    return reason.split(":")[0][:60]


def default_short_side(resolution: int) -> int:
    """Default image short side for ``resolution``-px crops: ``resolution x 8 / 7`` rounded up to a multiple of 16
    (256 for 224, the classic resize-256-crop-224), so a crop of the whole image is never enlarged. Smaller
    random-resized crops are enlarged more than from a bigger original (a crop of area 0.2 is 114 px of a 256-px
    image, 168 px of a 375-px ImageNet photo); ``resolution / sqrt(min scale)`` (501 px for 224 at scale 0.2)
    keeps every crop at full detail, at about 4x the decoding cost of 256."""
    return int(math.ceil(resolution * 8 / 7 / 16) * 16)


def parse_size(text) -> int:
    """``"1GB"``, ``"500MB"``, ``"64k"``, ``1e9`` -> bytes (powers of 1000)."""
    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*([kmgt]?)b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"cannot read the size {text!r}: write e.g. 1GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * 1000 ** " kmgt".index(match.group(2) or " "))


# ---------------------------------------------------------------------------------------------- one sample

def _target_size(width: int, height: int, short_side: int, max_side: int | None) -> tuple[int, int]:
    scale = min(1.0, short_side / min(width, height))
    if max_side:
        scale = min(scale, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _raw_jpeg(source, index: int) -> bytes | None:
    """The file's own bytes when the source item is a JPEG on disk or in a shard (stored unchanged if no resize)."""
    if isinstance(source, ImageList):
        item = source.items[index]
        if isinstance(item, str) and item.lower().endswith((".jpg", ".jpeg")):
            return Path(item).read_bytes()
    elif isinstance(source, TarShards):
        shard, offset, size, member = source.entries[index]
        if member.lower().endswith((".jpg", ".jpeg")):
            with open(source.shards[shard], "rb") as raw:
                raw.seek(offset)
                return raw.read(size)
    return None


def prepare_image(source, index: int, settings: ImageSettings) -> tuple[bytes, str, dict]:
    """``(bytes, extension, index fields)`` of image ``index`` as stored (``UnreadableMediaError`` if unreadable)."""
    image = source.load(index)  # decoded and checked (EXIF orientation applied, RGB)
    size = _target_size(*image.size, settings.short_side, settings.max_side)
    if size == image.size:
        raw = _raw_jpeg(source, index)
        if raw is not None:
            return raw, "jpg", {"width": image.width, "height": image.height}
    else:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=settings.quality)
    return buffer.getvalue(), "jpg", {"width": image.width, "height": image.height}


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def prepare_video(path: str, settings: VideoSettings) -> tuple[bytes, str, dict]:
    """``(mp4 bytes, "mp4", index fields)`` of the re-encoded video (``UnreadableMediaError`` if unreadable)."""
    if not os.path.isfile(path):
        raise UnreadableMediaError(f"video {path} does not exist")
    if os.path.getsize(path) == 0:
        raise UnreadableMediaError(f"video {path} is empty (0 bytes)")
    with _open(path) as source:
        info = _stream_info(source, path)
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise UnreadableMediaError(f"video {path} reports no frame size")
        scale = min(1.0, settings.short_side / min(width, height))
        out_w, out_h = _even(width * scale), _even(height * scale)
        fps = min(settings.fps or info.fps / settings.frame_step, settings.max_fps, info.fps)
        rate = Fraction(fps).limit_denominator(1001)
        buffer = io.BytesIO()
        written = 0
        try:
            with av.open(buffer, "w", format="mp4") as out:
                video = out.add_stream("libx264", rate=rate)
                video.width, video.height, video.pix_fmt = out_w, out_h, "yuv420p"
                gop = max(1, int(math.floor(float(rate) * settings.keyframe_interval)))
                video.codec_context.gop_size = gop
                options = {"crf": str(settings.crf), "preset": settings.preset}
                if settings.tune:
                    options["tune"] = settings.tune
                video.options = options
                time_base = float(stream.time_base) if stream.time_base else None
                origin = stream.start_time or 0
                for counter, frame in enumerate(source.decode(stream)):
                    seconds = ((frame.pts - origin) * time_base if frame.pts is not None and time_base
                               else counter / info.fps)
                    # output frame k shows the source frame on screen at time k / fps
                    while written / float(rate) <= seconds + 0.5 / info.fps:
                        picture = frame.reformat(width=out_w, height=out_h, format="yuv420p",
                                                 interpolation="AREA")
                        picture.pts, picture.time_base = written, 1 / rate
                        for packet in video.encode(picture):
                            out.mux(packet)
                        written += 1
                for packet in video.encode():
                    out.mux(packet)
        except UnreadableMediaError:
            raise
        except Exception as error:  # corrupt packets, decoder errors
            raise UnreadableMediaError(f"error decoding video {path}: {type(error).__name__}: {error}") from error
    if written == 0:
        raise UnreadableMediaError(f"video {path}: no frame could be decoded")
    return buffer.getvalue(), "mp4", {"width": out_w, "height": out_h, "frames": written, "fps": float(rate),
                                      "source_fps": info.fps, "source_frames": info.num_frames}


# ---------------------------------------------------------------------------------------------- shards

def _write_shard(folder: Path, name: str, samples: list[tuple[str, str, bytes, int | None]]) -> int:
    """Write ``samples`` ``(key, extension, bytes, label)`` as ``name`` via a temporary file; returns its bytes."""
    tmp = folder / (name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, extension, data, label in samples:
            members = [(f"{key}.{extension}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(int(label)).encode()))
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, folder / name)
    return (folder / name).stat().st_size


def _offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of a tar just written here (headers only)."""
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


_WORKER: dict = {}


def _init_worker(kind, source, settings):
    # PyAV's own log level stays None (FFmpeg's messages dropped in C; decoding errors are reported per file):
    # any other level routes every FFmpeg message through a Python callback that takes the GIL, which deadlocks a
    # frame-threaded decoder thread against a main thread holding the GIL - in this process, when workers <= 1
    _WORKER.update(kind=kind, source=source, settings=settings)


def _make_shard(task) -> dict:
    """Worker: one shard from its items; returns the shard's index (also written next to it)."""
    folder, number, items = task
    kind, source, settings = _WORKER["kind"], _WORKER["source"], _WORKER["settings"]
    folder = Path(folder)
    name = f"shard-{number:06d}.tar"
    samples, fields, skipped = [], [], []
    for index in items:
        source_name = source.name(index)
        try:
            if kind == "image":
                data, extension, info = prepare_image(source, index, settings)
            else:
                data, extension, info = prepare_video(source.paths[index], settings)
        except UnreadableMediaError as error:
            skipped.append([source_name, str(error)])
            continue
        key = f"{index:09d}"
        label = source.label(index)
        samples.append((key, extension, data, label))
        fields.append({"key": key, "member": f"{key}.{extension}", "label": label, "source": source_name, **info})
    size = _write_shard(folder, name, samples)
    offsets = _offsets(folder / name)
    for entry in fields:
        entry["offset"], entry["size"] = offsets[entry["member"]]
    index = {"shard": name, "kind": kind, "bytes": size, "samples": fields, "inputs": len(items),
             "skipped": skipped}
    tmp = folder / (shard_index_name(name) + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, folder / shard_index_name(name))
    return index


def _plan(folder: Path, kind: str, count: int, per_shard: int, seed: int | None, settings: dict) -> list[list[int]]:
    """The items of each shard: a seeded shuffle of ``range(count)`` cut into runs of ``per_shard``; saved in
    ``plan.json`` so an interrupted preparation resumes with the same shards (and refuses other settings)."""
    path = folder / PLAN
    wanted = {"kind": kind, "files": count, "per_shard": per_shard, "seed": seed, "settings": settings}
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [k for k in wanted if saved.get(k) != json.loads(json.dumps(wanted[k]))]
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} then, {wanted[k]!r} now" for k in changed)
            raise ValueError(f"{folder} holds a preparation with other settings ({detail}); choose another --out, "
                             f"or delete {folder} to start again")
    order = np.random.default_rng(seed).permutation(count) if seed is not None else np.arange(count)
    shards = [order[i:i + per_shard].tolist() for i in range(0, count, per_shard)]
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted) + "\n")
    return shards


def _per_shard(kind, source, settings, shard_bytes: int, pilot: int = 8) -> int:
    """Samples per shard for about ``shard_bytes`` per shard, from the stored size of the first readable items."""
    sizes = []
    for index in range(min(len(source), 4 * pilot)):
        try:
            data = (prepare_image(source, index, settings) if kind == "image"
                    else prepare_video(source.paths[index], settings))[0]
        except UnreadableMediaError:
            continue
        sizes.append(len(data) + 1536)  # + tar headers of the media and label members
        if len(sizes) == pilot:
            break
    if not sizes:
        return max(1, len(source))
    return max(1, int(shard_bytes / float(np.mean(sizes))))


def _prepare(kind: str, source, out, settings, *, shard_size: int | str = "1GB", samples_per_shard: int | None = None,
             workers: int = 1, seed: int | None = 0, progress: bool | None = None) -> Summary:
    started = time.perf_counter()
    folder = Path(out)
    if samples_per_shard is None:
        plan_file = folder / PLAN
        samples_per_shard = (json.loads(plan_file.read_text())["per_shard"] if plan_file.is_file() else
                             _per_shard(kind, source, settings, parse_size(shard_size)))
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shards = _plan(folder, kind, len(source), samples_per_shard, seed, asdict(settings))
    summary = Summary(kind, files_in=len(source), shards=len(shards))
    indexes: dict[int, dict] = {}
    todo = []
    for number, items in enumerate(shards):
        index_file = folder / shard_index_name(f"shard-{number:06d}.tar")
        if index_file.is_file() and (folder / f"shard-{number:06d}.tar").is_file():
            indexes[number] = json.loads(index_file.read_text())
            summary.shards_kept += 1
        else:
            todo.append((str(folder), number, items))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(source), initial=sum(len(shards[n]) for n in indexes), unit=kind, desc=f"prepare {kind}s",
               disable=(not progress) if progress is not None else None)
    if workers <= 1 or len(todo) <= 1:
        _init_worker(kind, source, settings)
        results = map(_make_shard, todo)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(todo)), _init_worker,
                                                         (kind, source, settings))
        results = pool.imap_unordered(_make_shard, todo)
    try:
        for index in results:
            number = int(index["shard"][len("shard-"):-len(".tar")])
            indexes[number] = index
            bar.update(index["inputs"])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    classes = getattr(source, "classes", None)
    entries = []
    for number in sorted(indexes):
        index = indexes[number]
        entries.append({"name": index["shard"], "index": shard_index_name(index["shard"]),
                        "num_samples": len(index["samples"]), "bytes": index["bytes"]})
        summary.written += len(index["samples"])
        summary.bytes += index["bytes"]
        summary.skipped.extend(index["skipped"])
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "num_samples": summary.written,
                "labelled": source.labels is not None, "classes": list(classes) if classes else None,
                "settings": asdict(settings), "shards": entries}
    (folder / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(folder / (MANIFEST + ".tmp"), folder / MANIFEST)
    summary.seconds = time.perf_counter() - started
    return summary


def prepare_images(images, out, settings: ImageSettings, **kwargs) -> Summary:
    """Prepared image shards from any image source ``arlow pretrain`` accepts, in the folder ``out``.

    ``kwargs``: ``shard_size`` (bytes or ``"1GB"``; the samples per shard come from the stored size of the first
    few items) or ``samples_per_shard``, ``workers`` (processes), ``seed`` (item shuffle; ``None``: source order),
    ``progress`` (``None``: a bar when the output is a terminal).
    """
    return _prepare("image", image_source(images), out, settings, **kwargs)


def prepare_videos(videos, out, settings: VideoSettings, **kwargs) -> Summary:
    """Prepared video shards from any video source ``arlow pretrain`` accepts (see :func:`prepare_images`)."""
    return _prepare("video", video_source(videos), out, settings, **kwargs)


# ---------------------------------------------------------------------------------------------- command
# (its arguments are declared in arlow_cli, which parses without importing torch)

def _video_rate(choice: str, data: dict) -> tuple[float | None, int]:
    """``--fps`` -> ``(fps, frame_step)`` of :class:`VideoSettings`."""
    if choice == "source":
        return None, 1
    if choice == "clip":
        if data.get("clip_fps"):
            return float(data["clip_fps"]), 1
        return None, int(data.get("frame_stride", 4))
    try:
        fps = float(choice)
    except ValueError:
        raise ValueError(f"--fps takes a number, 'source' or 'clip', got {choice!r}") from None
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    return fps, 1


def run(args: argparse.Namespace, data: dict) -> int:
    """``arlow prepare-data``: ``args`` as parsed by ``arlow_cli``; ``data`` the recipe's data section (sources,
    ``resolution``, ``frame_stride``/``clip_fps``), loaded by the caller - :mod:`arlow.pretrain.prepare_data`, since
    this floor must not import the pretraining recipe code above it."""
    data = dict(data or {})
    images = args.images if args.images is not None else data.get("images", "builtin")
    videos = args.videos if args.videos is not None else data.get("videos")
    builtin_images, builtin_videos = builtin_media()
    images = None if args.no_images else (builtin_images if images == "builtin" else images)
    videos = None if args.no_videos else (builtin_videos if videos == "builtin" else videos)
    if images is None and videos is None:
        raise ValueError("nothing to prepare: give --images and/or --videos (or a recipe that names them)")
    if not 0 < args.keyframe_interval <= 1.0:
        raise ValueError(f"--keyframe-interval must be in (0, 1] seconds, got {args.keyframe_interval}")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {args.quality}")
    common = dict(shard_size=args.shard_size, samples_per_shard=args.samples_per_shard, workers=args.workers,
                  seed=None if args.no_shuffle else args.seed)
    out = Path(args.out)
    summaries = []
    if images is not None:
        short = args.short_side or default_short_side(int(data.get("resolution", 224)))
        summaries.append(prepare_images(images, out / "images", ImageSettings(short, args.max_side, args.quality),
                                        **common))
    if videos is not None:
        fps, step = _video_rate(args.fps, data)
        settings = VideoSettings(args.video_short_side, fps, step, keyframe_interval=args.keyframe_interval,
                                 crf=args.crf, preset=args.preset, tune=None if args.tune == "none" else args.tune)
        summaries.append(prepare_videos(videos, out / "videos", settings, **common))
    for summary in summaries:
        print("\n".join(summary.lines()))
    print(f"train from them: arlow pretrain data.images={out / 'images' if images is not None else 'null'} "
          f"data.videos={out / 'videos' if videos is not None else 'null'}")
    return 0
