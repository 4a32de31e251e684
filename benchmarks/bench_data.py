"""MAE data pipeline throughput: images/s and clips/s per worker, so you know how many workers feed a GPU.

One worker = one process with one torch thread (what a DataLoader worker gets), doing decode + random resized crop
+ flip + normalise + patchify at 224 px. Media (made in a temp dir from the built-in photos and Big Buck Bunny):

* photos: the built-in JPEGs (longest side <= 320 px) and the same photos re-encoded at ImageNet's typical size
  (500 px longest side, JPEG q90);
* clips of 16 frames at stride 4 from: the built-in 320x180 clip, a UCF101-like 320x240 25 fps 7.2 s H.264
  video and a 640x360 25 fps 10 s video (Kinetics-like, after the usual short-side-360 resize).

Also: clip decoding with and without seeking for clips late in a long video, and the whole pipeline (2 workers,
25% clips, 4096-row budget) as micro-batches/s and fill of the token budget.

Prepared shards (``arlow prepare-data``, issue 17): the same photos and videos prepared with the defaults (photos
at short side 256, and at 501 = kept as they are; videos re-encoded at short side 256 with a keyframe every
second, at the source rate or at the clip rate = source fps / stride) and
read back as a streaming worker does (decode from the stored bytes + crop/flip + normalise + patchify), in the
same interleaved run as the raw files, so the ratios hold on a loaded machine. Then: the 25%-clip mix per worker
(computed from the per-sample rates, and measured end to end over the shards), workers per GPU for ViT-L/14 and
the card encoder, start-up time for a synthesised 1-million-sample prepared set, and memory per worker.

Patch rows leave the worker as uint8 and are normalised on the training device, as ``arlow pretrain`` runs
(``--normalise-in worker``: float32 rows normalised in the worker, as before 2026-12-05); raw files and prepared
shards always use the same placement.

Rates are given from wall-clock time (median and spread over the interleaved repeats) and from the process's CPU
time, which other processes on a shared machine disturb far less (a worker with a core to itself runs at about its
CPU-time rate).

    python benchmarks/bench_data.py                    # about 3-5 minutes on 2 quiet cores
    python benchmarks/bench_data.py --prepared-only    # only the prepared-shard sections
    python benchmarks/bench_data.py --quick            # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, interleaved_wall_and_cpu, machine_line, markdown_table, median  # noqa: E402

from arlow.data.clips import probe_video, read_frames  # noqa: E402
from arlow.data.prepare import ImageSettings, VideoSettings, default_short_side, prepare_images, \
    prepare_videos  # noqa: E402
from arlow.data.shards import MANIFEST, ShardSet, ShardStream, shard_index_name  # noqa: E402
from arlow.data.sources import builtin_media  # noqa: E402
from arlow.pretrain.data import IMAGE, VIDEO, PretrainData  # noqa: E402
from arlow.pretrain.stream import StreamingPretrainData, _StreamWorker  # noqa: E402

# where the patch rows are normalised (set by --normalise-in): "device" = uint8 rows out of the worker, as
# `arlow pretrain` runs (the training device normalises them); "worker" = float32 rows normalised in the worker
PLACEMENT = {"normalise": False}
RAW_PHOTOS, RAW_CLIPS = "ImageNet-size photos (500 px)", "UCF101-like 320x240, 180 frames"


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
        data = PretrainData(paths, resolution=224, check_sources=False, **PLACEMENT)
        candidates[name], counts[name] = _samples(data, IMAGE, args.images), args.images
    for name, path in videos.items():
        data = PretrainData(None, [path], resolution=224, clip_frames=16, frame_stride=4, check_sources=False,
                            **PLACEMENT)
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
                            tokens_per_batch=4096, num_workers=workers, seed=0, check_sources=False,
                            **PLACEMENT)
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


# ------------------------------------------------------------------------------------------ prepared shards

VIDEO_VARIANTS = {"source rate": VideoSettings(256, tune=None),
                  "clip rate": VideoSettings(256, frame_step=4, tune=None),
                  "clip rate, fastdecode (default)": VideoSettings(256, frame_step=4)}
BEST = "clip rate, fastdecode (default)"


def prepare_media(tmp: Path, photo_sets, videos) -> dict:
    """Prepared sets (``arlow prepare-data``'s functions): the 500-px photos with the defaults for 224-px crops,
    and the UCF101-like and 640x360 videos in each of VIDEO_VARIANTS (short side 256, a keyframe every second)."""
    sets = {"photos": tmp / "prepared" / "photos", "photos501": tmp / "prepared" / "photos501"}
    prepare_images(photo_sets[RAW_PHOTOS], sets["photos"], ImageSettings(default_short_side(224)),
                   samples_per_shard=8, progress=False)
    prepare_images(photo_sets[RAW_PHOTOS], sets["photos501"], ImageSettings(501), samples_per_shard=8,
                   progress=False)
    for number, name in enumerate(list(videos)[1:]):
        for label, settings in VIDEO_VARIANTS.items():
            folder = tmp / "prepared" / f"video{number}-{label.replace(' ', '').replace(',', '-')}"
            prepare_videos([videos[name]], folder, settings, samples_per_shard=1, progress=False)
            sets[(name, label)] = folder
    return sets


def _prepared_samples(data: StreamingPretrainData, kind: int, count: int):
    """A candidate that makes ``count`` samples from the stored bytes as a streaming worker does."""
    shard_set = data.images if kind == IMAGE else data.videos
    stored = list(ShardStream(shard_set, range(len(shard_set.names)), np.arange(len(shard_set))))
    worker = _StreamWorker(data, 0)
    state = {"k": 0}

    def run():
        for _ in range(count):
            k = state["k"]
            entry, raw = stored[k % len(stored)]
            rng = np.random.default_rng(k)
            worker.rows(kind, entry, raw, rng)
            state["k"] += 1

    return run


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def prepared_table(photo_sets, videos, sets, args) -> tuple[str, dict, dict]:
    """Raw files and prepared shards, interleaved in one run: samples/s per worker from wall-clock time (median and
    spread over the repeats) and from this process's CPU time (what the worker costs when it has a core to itself;
    far less disturbed by other processes on a shared machine)."""
    common = dict(resolution=224, clip_frames=16, frame_stride=4, check_sources=False, **PLACEMENT)
    candidates, counts = {}, {}
    raw_photos = PretrainData(photo_sets[RAW_PHOTOS], **common)
    candidates[("raw", RAW_PHOTOS)], counts[("raw", RAW_PHOTOS)] = _samples(raw_photos, IMAGE, args.images), args.images
    for how, folder in (("prepared", sets["photos"]), ("prepared 501", sets["photos501"])):
        prepared = StreamingPretrainData(folder, **common)
        candidates[(how, RAW_PHOTOS)], counts[(how, RAW_PHOTOS)] = (_prepared_samples(prepared, IMAGE, args.images),
                                                                    args.images)
    for name in list(videos)[1:]:
        raw = PretrainData(None, [videos[name]], **common)
        candidates[("raw", name)], counts[("raw", name)] = _samples(raw, VIDEO, args.clips), args.clips
        for label in VIDEO_VARIANTS:
            data = StreamingPretrainData(None, sets[(name, label)], **common)
            candidates[(label, name)], counts[(label, name)] = _prepared_samples(data, VIDEO, args.clips), args.clips
        data = StreamingPretrainData(None, sets[(name, BEST)], decoder_threads=2, **common)
        key = ("default, 2 decoder threads (2 cores)", name)
        candidates[key], counts[key] = _prepared_samples(data, VIDEO, args.clips), args.clips
    times, cpu = interleaved_wall_and_cpu(candidates, repeats=args.repeats, warmup=1)
    rates = {key: counts[key] / median(times[key]) for key in candidates}
    cpu_rates = {key: counts[key] / median(cpu[key]) for key in candidates}
    rows = []
    for (how, name), rate in rates.items():
        base, cpu_base, cpu_rate = rates[("raw", name)], cpu_rates[("raw", name)], cpu_rates[(how, name)]
        label = {"raw": "raw file", "prepared": "prepared, short side 256 (default for 224 px)",
                 "prepared 501": "prepared, short side 501 (kept as they are)"}.get(how, f"prepared, {how}")
        rows.append([name, label, f"{rate:.1f}", _spread([counts[(how, name)] / t for t in times[(how, name)]]),
                     f"{rate / base:.2f}x", f"{cpu_rate:.1f}", f"{1000 / cpu_rate:.1f}", f"{cpu_rate / cpu_base:.2f}x"])
    table = markdown_table(["media", "read from", "samples/s (wall)", "spread", "vs raw (wall)",
                            "samples/s (CPU time)", "CPU ms/sample", "vs raw (CPU)"], rows)
    return table, rates, cpu_rates


def mix_rate(image_rate: float, clip_rate: float, video_prob: float = 0.25) -> float:
    return 1.0 / ((1 - video_prob) / image_rate + video_prob / clip_rate)


def stream_table(photo_sets, videos, sets, args, per_sample: dict | None = None) -> tuple[str, dict]:
    """End to end in one process (one worker's job): micro-batches 2..N, raw files vs prepared shards, alternated.

    The two pipelines draw their own mixes, so a short run's share of clips differs between them (and a clip costs
    ~10-30 photos): ``per_sample`` (``{name: (photo CPU rate, clip CPU rate)}`` from :func:`prepared_table`) turns
    each CPU-time rate into its rate at exactly 25% clips (measured x mix at 25% / mix at the run's share)."""
    common = dict(resolution=224, video_prob=0.25, clip_frames=16, frame_stride=4, tokens_per_batch=4096, seed=0,
                  check_sources=False, **PLACEMENT)
    makers = {"raw files": lambda: PretrainData(photo_sets[RAW_PHOTOS], [videos[RAW_CLIPS]], **common),
              "prepared shards (defaults)": lambda: StreamingPretrainData(
                  sets["photos"], sets[(RAW_CLIPS, BEST)], **common)}
    runs: dict[str, list[float]] = {name: [] for name in makers}
    cpu_runs: dict[str, list[float]] = {name: [] for name in makers}
    clip_share: dict[str, float] = {}
    for _ in range(args.repeats if not args.quick else 1):
        for name, make in makers.items():
            iterator = iter(make())
            next(iterator)
            start, start_cpu = time.perf_counter(), time.process_time()
            batches = [next(iterator) for _ in range(args.batches)]
            cpu_runs[name].append(sum(b["num_samples"] for b in batches) / (time.process_time() - start_cpu))
            samples = sum(b["num_samples"] for b in batches)
            runs[name].append(samples / (time.perf_counter() - start))
            # the two pipelines draw their own mixes: a run's share of clips sets its rate as much as the reader
            clip_share[name] = sum(int((b["grid_thw"][:, 0] > 1).sum()) for b in batches) / samples
    rates = {name: median(values) for name, values in runs.items()}
    cpu_rates = {name: median(values) for name, values in cpu_runs.items()}
    adjusted = {name: cpu_rates[name] * mix_rate(*per_sample[name]) / mix_rate(*per_sample[name], clip_share[name])
                for name in rates} if per_sample else None
    rows = [[name, f"{clip_share[name]:.1%}", f"{rate:.1f}", _spread(runs[name]), f"{rate / rates['raw files']:.2f}x",
             f"{cpu_rates[name]:.1f}", f"{cpu_rates[name] / cpu_rates['raw files']:.2f}x"]
            + ([f"{adjusted[name]:.1f}", f"{adjusted[name] / adjusted['raw files']:.2f}x"] if adjusted else [])
            for name, rate in rates.items()]
    return markdown_table(["25%-clip mix from", "clips in the run", "samples/s (wall)", "spread", "vs raw files",
                           "samples/s (CPU time)", "vs raw files (CPU)"]
                          + (["CPU time at 25% clips", "vs raw files"] if adjusted else []), rows), rates


def gpu_rates() -> dict[str, float]:
    """Samples/s one GPU trains at, 25% 16-frame clips at 224 px: ViT-L/14 from peers-and-anchors.md C.1, the card
    encoder from its model FLOPs (``mae_train_flops``) at 40% MFU of an H100's 989 dense bf16 TFLOP/s."""
    from arlow.pretrain.mae import ArlowMAEConfig, mae_train_flops

    card = ArlowMAEConfig()  # the published encoder + the card's decoder (width 512, depth 8)
    image = mae_train_flops(card, torch.tensor([[1, 16, 16]]))
    clip = mae_train_flops(card, torch.tensor([[8, 16, 16]]))
    per_sample = 0.75 * image + 0.25 * clip
    return {"MAE ViT-L/14, H100 at 40% MFU (anchors C.1)": 775.0,
            f"card encoder ({per_sample / 1e12:.2f} TFLOP/sample), H100 at 40% MFU": 0.4 * 989e12 / per_sample}


def workers_table(mixes: dict[str, float]) -> str:
    rows = []
    for gpu, gpu_rate in gpu_rates().items():
        rows.append([gpu, f"{gpu_rate:.0f}"] + [f"{gpu_rate / rate:.0f}" for rate in mixes.values()])
    return markdown_table(["GPU job", "samples/s"] + [f"workers, {name} ({rate:.1f}/worker)"
                                                     for name, rate in mixes.items()], rows)


def startup_table(tmp: Path, args) -> str:
    """A synthesised prepared set of 1,000,000 samples (1,000 shards: manifest + index files, no tar bytes)."""
    shards, per_shard = (100, 1000) if args.quick else (1000, 1000)
    root = tmp / "million"
    root.mkdir()
    entries = []
    for number in range(shards):
        name = f"shard-{number:06d}.tar"
        samples = [{"key": f"{number * per_shard + i:09d}", "member": f"{number * per_shard + i:09d}.jpg",
                    "label": i % 1000, "width": 500, "height": 375, "offset": 512 + 1024 * 110 * i, "size": 110000}
                   for i in range(per_shard)]
        (root / shard_index_name(name)).write_text(json.dumps({"shard": name, "samples": samples}))
        entries.append({"name": name, "index": shard_index_name(name), "num_samples": per_shard, "bytes": 1.1e8})
    (root / MANIFEST).write_text(json.dumps({"format": "arlow-shards", "version": 1, "kind": "image",
                                             "labelled": True, "classes": None, "num_samples": shards * per_shard,
                                             "shards": entries}))
    rows = []
    start = time.perf_counter()
    data = StreamingPretrainData(root, None, resolution=224, world_size=8, rank=0, num_workers=8, epochs=None)
    built = time.perf_counter() - start
    plan = data.stream_epoch(0, 0)
    order = data._buffer_order(int((plan["kinds"] == IMAGE).sum()), data.shuffle_buffer, 0, 0, 23)
    first = time.perf_counter() - start
    rows.append([f"StreamingPretrainData on rank 0 of 8, 8 workers ({shards * per_shard:,} samples)",
                 f"{built:.3f}", "manifest + the first shard's index"])
    rows.append(["... + one worker's epoch plan (mixing, packing, shuffle order of its "
                 f"{len(order):,} samples)", f"{first:.3f}", "what a worker computes before its first shard"])
    start = time.perf_counter()
    count = sum(len(ShardSet.open(root).read_index(i)["samples"]) for i in range(shards))
    rows.append([f"reading every index file ({count:,} samples; a loader that listed every sample)",
                 f"{time.perf_counter() - start:.2f}", "not done at start-up"])
    return markdown_table(["start-up", "seconds", "what is read"], rows)


def _memory_job(make, batches, queue):
    import resource

    import psutil

    process = psutil.Process()
    before = process.memory_full_info()
    iterator = iter(make())
    for _ in range(batches):
        next(iterator)
    after = process.memory_full_info()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    queue.put((before.uss, after.uss, after.rss, peak))


def memory_table(photo_sets, videos, sets, args) -> str:
    """A worker is a forked process: its unique memory (USS) after making micro-batches, raw vs prepared."""
    import multiprocessing

    common = dict(resolution=224, video_prob=0.25, clip_frames=16, frame_stride=4, tokens_per_batch=4096, seed=0,
                  check_sources=False, **PLACEMENT)
    jobs = {"raw files": lambda: PretrainData(photo_sets[RAW_PHOTOS], [videos[RAW_CLIPS]], **common),
            "prepared shards, shuffle buffer 1000 images / 16 videos": lambda: StreamingPretrainData(
                sets["photos"], sets[(RAW_CLIPS, BEST)], **common)}
    rows = []
    context = multiprocessing.get_context("fork")
    for name, make in jobs.items():
        queue = context.Queue()
        process = context.Process(target=_memory_job, args=(make, args.batches, queue))
        process.start()
        before, after, rss, peak = queue.get()
        process.join()
        rows.append([name, f"{before / 2**20:.0f}", f"{after / 2**20:.0f}", f"{rss / 2**20:.0f}",
                     f"{peak / 2**20:.0f}"])
    return markdown_table(["worker reading", "unique MiB at start", f"unique MiB after {args.batches} micro-batches",
                           "resident MiB (shared pages included)", "peak resident MiB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (fewer samples, one repeat)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each measurement (default 5)")
    parser.add_argument("--prepared-only", action="store_true",
                        help="only the prepared-shard sections (raw files vs prepared shards, mix, workers per GPU, "
                             "start-up, memory): skips the raw-file tables and the 2-worker pipeline")
    parser.add_argument("--normalise-in", choices=("device", "worker"), default="device",
                        help="where patch rows are normalised, for raw files and prepared shards alike: 'device' "
                             "(default, what arlow pretrain does: workers hand over uint8 rows) or 'worker' (float32 "
                             "rows normalised in the worker, the placement before 2026-12-05)")
    args = parser.parse_args()
    PLACEMENT["normalise"] = args.normalise_in == "worker"
    torch.set_num_threads(1)  # what a DataLoader worker gets
    args.images, args.clips, args.batches, args.workers = 30, 3, 30, (0, 1, 2)
    if args.quick:
        args.images, args.clips, args.repeats, args.batches = 5, 1, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        photo_sets, videos = make_media(Path(tmp))
        print(f"# Data pipeline throughput ({machine_line()})\n")
        print(f"Patch rows normalised in the {args.normalise_in} (raw files and prepared shards alike).\n")
        if not args.prepared_only:
            raw_sections(photo_sets, videos, args)
        prepared_sections(Path(tmp), photo_sets, videos, args)


def raw_sections(photo_sets, videos, args) -> None:
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
    print(pipeline_table(photo_sets, videos, args) + "\n")


def prepared_sections(tmp: Path, photo_sets, videos, args) -> None:
    sets = prepare_media(tmp, photo_sets, videos)
    print("## Prepared shards\n")
    table, prates, pcpu = prepared_table(photo_sets, videos, sets, args)
    print("Per worker (1 process, 1 thread), raw files and prepared shards in one interleaved run:\n")
    print(table + "\n")
    mixes = {"raw files": mix_rate(prates[("raw", RAW_PHOTOS)], prates[("raw", RAW_CLIPS)])}
    for label in VIDEO_VARIANTS:
        mixes[f"prepared, {label}"] = mix_rate(prates[("prepared", RAW_PHOTOS)], prates[(label, RAW_CLIPS)])
    mixes["prepared, default, photos at 501"] = mix_rate(prates[("prepared 501", RAW_PHOTOS)],
                                                         prates[(BEST, RAW_CLIPS)])
    cpu_mixes = {"raw files": mix_rate(pcpu[("raw", RAW_PHOTOS)], pcpu[("raw", RAW_CLIPS)])}
    for label in VIDEO_VARIANTS:
        cpu_mixes[f"prepared, {label}"] = mix_rate(pcpu[("prepared", RAW_PHOTOS)], pcpu[(label, RAW_CLIPS)])
    cpu_mixes["prepared, default, photos at 501"] = mix_rate(pcpu[("prepared 501", RAW_PHOTOS)],
                                                             pcpu[(BEST, RAW_CLIPS)])
    share = 0.25 / pcpu[(BEST, RAW_CLIPS)] * cpu_mixes[f"prepared, {BEST}"]
    print("25%-clip mix per worker, from the rates above (ImageNet-size photos + UCF101-like clips):\n")
    print(markdown_table(["read from", "samples/s (wall)", "vs raw files", "samples/s (CPU time)", "vs raw (CPU)"],
                         [[k, f"{v:.1f}", f"{v / mixes['raw files']:.2f}x", f"{cpu_mixes[k]:.1f}",
                           f"{cpu_mixes[k] / cpu_mixes['raw files']:.2f}x"] for k, v in mixes.items()]) + "\n")
    print(f"Prepared, defaults: clips take {share:.0%} of a worker's CPU time, images {1 - share:.0%}.\n")
    table, srates = stream_table(photo_sets, videos, sets, args, per_sample={
        "raw files": (pcpu[("raw", RAW_PHOTOS)], pcpu[("raw", RAW_CLIPS)]),
        "prepared shards (defaults)": (pcpu[("prepared", RAW_PHOTOS)], pcpu[(BEST, RAW_CLIPS)])})
    print(f"The same mix end to end (micro-batches 2-{args.batches + 1}, alternated runs):\n")
    print(table + "\n")
    print("Workers per GPU (GPU samples/s / samples/s per worker):\n")
    print(workers_table({"raw files": mixes["raw files"], "prepared": mixes[f"prepared, {BEST}"],
                         "prepared, CPU time": cpu_mixes[f"prepared, {BEST}"]}) + "\n")
    print("Start-up from index files:\n")
    print(startup_table(tmp, args) + "\n")
    print("Memory per worker:\n")
    print(memory_table(photo_sets, videos, sets, args))


if __name__ == "__main__":
    main()
