"""MAE data pipeline throughput: images/s and clips/s per worker, so you know how many workers feed a GPU.

One worker = one process with one torch thread (what a DataLoader worker gets), doing decode + random resized crop
+ flip + normalise + patchify at 224 px. Media (made in a temp dir from the built-in photos and Big Buck Bunny):

* photos: the built-in JPEGs (longest side <= 320 px) and the same photos re-encoded at ImageNet's typical size
  (500 px longest side, JPEG q90);
* clips of 16 frames at stride 4 from: the built-in 320x180 clip, a UCF101-like 320x240 25 fps 7.2 s H.264
  video and a 640x360 25 fps 10 s video (Kinetics-like, after the usual short-side-360 resize).

Also: clip decoding with and without seeking for clips late in a long video, and the whole pipeline (2 workers,
25% clips, 4096-row budget) as micro-batches/s and fill of the token budget.

    python benchmarks/bench_data.py            # about 1-2 minutes on 2 cores
    python benchmarks/bench_data.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import time
from fractions import Fraction
from pathlib import Path

import av
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine_line, markdown_table, median  # noqa: E402

from arlow.data.clips import probe_video, read_frames  # noqa: E402
from arlow.data.sources import builtin_media  # noqa: E402
from arlow.pretrain.data import IMAGE, VIDEO, PretrainData  # noqa: E402


def make_media(tmp: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Photo sets and test videos derived from the built-in media."""
    photos, clips = builtin_media()
    large = []
    (tmp / "large").mkdir()
    for path in photos:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = 500 / max(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
            out = tmp / "large" / Path(path).name
            im.save(out, quality=90)
            large.append(str(out))
    with av.open(clips[0]) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    with av.open(clips[1]) as c:
        frames += [f.to_image() for f in c.decode(video=0)]
    videos = {"built-in 320x180, 66 frames": clips[0],
              "UCF101-like 320x240, 180 frames": _encode(tmp / "ucf.mp4", frames, (320, 240), 180),
              "640x360, 250 frames": _encode(tmp / "k400.mp4", frames, (640, 360), 250)}
    return {"built-in photos (<= 320 px)": photos, "ImageNet-size photos (500 px)": large}, videos


def _encode(path: Path, frames, size, count) -> str:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "fast"}
        stream.codec_context.gop_size = 50  # a keyframe every 2 s, as in typical web video
        for k in range(count):
            image = frames[k % len(frames)].resize(size, Image.Resampling.BILINEAR)
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _samples(data: PretrainData, kind: int, count: int):
    """A candidate that makes ``count`` samples one after another (cycling over the source, fresh crops)."""
    n = len(data.images if kind == IMAGE else data.videos)
    state = {"k": 0}

    def run():
        for _ in range(count):
            k = state["k"]
            data.sample(kind, k % n, 1, k)
            state["k"] += 1

    return run


def worker_table(photo_sets, videos, args) -> tuple[str, dict]:
    candidates, counts = {}, {}
    for name, paths in photo_sets.items():
        data = PretrainData(paths, resolution=224, check_sources=False)
        candidates[name], counts[name] = _samples(data, IMAGE, args.images), args.images
    for name, path in videos.items():
        data = PretrainData(None, [path], resolution=224, clip_frames=16, frame_stride=4, check_sources=False)
        candidates[name], counts[name] = _samples(data, VIDEO, args.clips), args.clips
    times = interleaved_times(candidates, repeats=args.repeats)
    rows, rates = [], {}
    for name in candidates:
        rate = counts[name] / median(times[name])
        rates[name] = rate
        kind = "image" if name in photo_sets else "16-frame clip, stride 4"
        rows.append([name, kind, f"{rate:.1f}", f"{1000 / rate:.1f}", 256 if name in photo_sets else 2048])
    table = markdown_table(["media", "sample", "samples/s per worker", "ms/sample", "patch rows"], rows)
    return table, rates


def seek_table(videos, args) -> str:
    candidates, spans = {}, {}
    for name in list(videos)[1:]:
        path = videos[name]
        info = probe_video(path)
        for where, fraction in (("start", 0.0), ("middle", 0.5), ("end", 1.0)):
            first = int(fraction * (info.num_frames - 1 - 4 * 15))
            indices = [first + 4 * j for j in range(16)]
            spans[(name, where)] = f"{indices[0]}-{indices[-1]}"
            for seek in (True, False):
                candidates[(name, where, seek)] = (lambda p=path, i=indices, s=seek: read_frames(p, i, seek=s))
    times = interleaved_times(candidates, repeats=args.repeats)
    rows = [[name, where, spans[(name, where)], f"{median(times[(name, where, True)]) * 1000:.0f}",
             f"{median(times[(name, where, False)]) * 1000:.0f}"] for (name, where) in spans]
    return markdown_table(["video", "clip at", "frames", "ms with seek", "ms decoding from the start"], rows)


def pipeline_table(photo_sets, videos, args) -> str:
    """Sequential runs (prefetching loaders cannot be interleaved fairly): micro-batches 2..N of each run."""
    photos = photo_sets["ImageNet-size photos (500 px)"]
    video_list = [videos["UCF101-like 320x240, 180 frames"]]
    rows = []
    for workers in args.workers:
        data = PretrainData(photos, video_list, resolution=224, video_prob=0.25, clip_frames=16, frame_stride=4,
                            tokens_per_batch=4096, num_workers=workers, seed=0, check_sources=False)
        iterator = iter(data)
        next(iterator)  # start-up (worker processes) is not throughput
        start = time.perf_counter()
        batches = [next(iterator) for _ in range(args.batches)]
        elapsed = time.perf_counter() - start
        samples = sum(b["num_samples"] for b in batches)
        tokens = sum(b["num_tokens"] for b in batches)
        rows.append([workers, f"{len(batches) / elapsed:.2f}", f"{samples / elapsed:.1f}", f"{tokens / elapsed:.0f}",
                     f"{tokens / (len(batches) * 4096):.0%}"])
        del iterator
    return markdown_table(["workers", "micro-batches/s", "samples/s", "patch rows/s", "budget filled"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (fewer samples, one repeat)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets
    args.images, args.clips, args.repeats, args.batches, args.workers = 30, 3, 5, 30, (0, 1, 2)
    if args.quick:
        args.images, args.clips, args.repeats, args.batches = 5, 1, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        photo_sets, videos = make_media(Path(tmp))
        print(f"# Data pipeline throughput ({machine_line()})\n")
        table, rates = worker_table(photo_sets, videos, args)
        print("Per worker (1 process, 1 thread), 224 px, decode + crop/flip + normalise + patchify:\n")
        print(table + "\n")
        img = rates["ImageNet-size photos (500 px)"]
        clip = rates["UCF101-like 320x240, 180 frames"]
        per_sample = 0.75 / img + 0.25 / clip
        print(f"Mixed 25% clips (ImageNet-size photos, UCF101-like clips): {1 / per_sample:.1f} samples/s per "
              f"worker ({0.25 / clip / per_sample:.0%} of worker time decoding clips).\n")
        print("Clip decoding, seek vs decoding from the start (16 frames, stride 4):\n")
        print(seek_table(videos, args) + "\n")
        print("Whole pipeline (ImageNet-size photos + UCF101-like clips, 25% clips, 4096-row budget), this "
              "machine's 2 cores:\n")
        print(pipeline_table(photo_sets, videos, args))


if __name__ == "__main__":
    main()
