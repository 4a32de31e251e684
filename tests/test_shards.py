"""Prepared shards: `arlow prepare-data` round trip and resume, streaming from a local HTTP server, exact resume
mid-shard, disjoint and complete shares across ranks. Media are made here (tiny) or are the built-in ones."""

import functools
import http.server
import io
import os
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

from arlow.cli import main
from arlow.data.prepare import ImageSettings, VideoSettings, default_short_side, parse_size, prepare_images, \
    prepare_videos
from arlow.data.shards import ShardSet, ShardStream, deal, shuffle_order
from arlow.data.sources import ImageList, builtin_media
from arlow.data.augment import image_normalisation
from arlow.pretrain.data import IMAGE, VIDEO, PretrainData
from arlow.pretrain.stream import StreamingPretrainData, _StreamWorker, patch_view
from arlow.processing.patches import patchify
from media import level_frames, write_video

SMALL = dict(resolution=56, clip_frames=4, frame_stride=2, tokens_per_batch=256, seed=3)


def _smooth(width, height, seed):
    """A smooth RGB image (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    channels = [127 + 100 * np.sin(x / width * 3 + phase[c]) * np.cos(y / height * 2 + phase[c]) for c in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def _decoded(entry_data):
    return Image.open(io.BytesIO(entry_data)).convert("RGB")


def _all_samples(shard_set):
    return list(ShardStream(shard_set, range(len(shard_set.names)), np.arange(len(shard_set))))


def _batches(data, n):
    iterator = iter(data)
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["grid_thw"], y["grid_thw"]) and torch.equal(x["pixel_values"], y["pixel_values"])


# ------------------------------------------------------------------------------------------------ prepare

def test_prepare_round_trip_images_and_videos(tmp_path):
    root = tmp_path / "imagenet"
    originals = {}
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate([(80, 60), (40, 30), (50, 90)]):
            image = _smooth(*size, seed=10 * c + i)
            path = root / cls / (f"{i}.jpg" if i == 1 else f"{i}.png")
            image.save(path, quality=95) if i == 1 else image.save(path)
            originals[str(path)] = (Image.open(path).convert("RGB"), c)
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    (root / "dog" / "empty.png").write_bytes(b"")
    summary = prepare_images(root, tmp_path / "out" / "images", ImageSettings(short_side=48), samples_per_shard=3,
                             workers=2, progress=False)
    assert (summary.files_in, summary.written, len(summary.skipped)) == (8, 6, 2)
    reasons = {os.path.basename(name): reason for name, reason in summary.skipped}
    assert "cannot decode" in reasons["broken.png"] and "is empty" in reasons["empty.png"]
    assert any("skipped 1: is empty" in line for line in summary.lines())

    shard_set = ShardSet.open(tmp_path / "out" / "images")
    assert shard_set.kind == "image" and shard_set.labelled and shard_set.classes == ["cat", "dog"]
    assert len(shard_set) == 6
    assert summary.bytes == sum(os.path.getsize(tmp_path / "out" / "images" / n) for n in shard_set.names)
    seen = set()
    for entry, data in _all_samples(shard_set):
        original, label = originals[entry["source"]]
        seen.add(entry["source"])
        stored = _decoded(data)
        assert entry["label"] == label and stored.size == (entry["width"], entry["height"])
        scale = min(1.0, 48 / min(original.size))  # short side 48, never enlarged
        assert stored.size == (round(original.width * scale), round(original.height * scale))
        if entry["source"].endswith(".jpg") and scale == 1.0:
            assert data == open(entry["source"], "rb").read()  # a JPEG that needs no resizing is kept as is
        reference = np.asarray(original.resize(stored.size, Image.Resampling.LANCZOS), dtype=np.float64)
        error = np.abs(np.asarray(stored, dtype=np.float64) - reference)
        assert error.mean() < 3.0 and error.max() < 48, (entry["source"], error.mean(), error.max())
    assert len(seen) == 6
    for shard in range(len(shard_set.names)):  # the index's offsets point at each member's bytes
        with open(tmp_path / "out" / "images" / shard_set.names[shard], "rb") as raw:
            for entry in shard_set.read_index(shard)["samples"]:
                raw.seek(entry["offset"])
                assert _decoded(raw.read(entry["size"])).size == (entry["width"], entry["height"])

    # videos: 10 fps numbered frames -> 5 fps, short side 32, a keyframe every second
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", level_frames(12, 48, 64), fps=10)
    (videos / "bad.mp4").write_bytes(b"\x00" * 100)
    summary = prepare_videos(videos, tmp_path / "out" / "videos", VideoSettings(short_side=32, fps=5),
                             samples_per_shard=4, progress=False)
    assert (summary.files_in, summary.written, len(summary.skipped)) == (2, 1, 1)
    # preparing in this process left PyAV's Python log callback off (with it, threaded decoding can deadlock)
    assert av.logging.get_level() is None
    [(entry, data)] = _all_samples(ShardSet.open(tmp_path / "out" / "videos"))
    assert (entry["width"], entry["height"], entry["fps"], entry["source_fps"]) == (42, 32, 5.0, 10.0)
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == entry["frames"] == 6
    keyframes = [k for k, f in enumerate(frames) if f.key_frame]
    assert keyframes[0] == 0 and max(np.diff(keyframes + [len(frames)])) <= 5
    levels = [float(np.asarray(f.to_image()).mean()) for f in frames]
    np.testing.assert_allclose(levels, 10 + 20 * 2 * np.arange(6), atol=6)  # frame k at 5 fps = source 2k (+-20: next)
    # a clip at frame_stride 2 (frames of the 10 fps original) takes every stored frame: same spacing in time
    stream = StreamingPretrainData(None, tmp_path / "out" / "videos", resolution=56, clip_frames=3, frame_stride=2,
                                   augment=False)
    clip = _StreamWorker(stream, 0).frames(VIDEO, entry, data, None)
    assert clip.shape == (3, 56, 56, 3) and clip.dtype == np.uint8
    assert np.diff(clip.reshape(3, -1).mean(1)) == pytest.approx([40, 40], abs=8)


def test_prepare_resumes_keeping_finished_shards_and_refuses_other_settings(tmp_path):
    images = builtin_media()[0][:7]
    out = tmp_path / "images"
    prepare_images(images, out, ImageSettings(short_side=64), samples_per_shard=2, progress=False)
    manifest = (out / "manifest.json").read_text()
    times = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / "shard-000002.tar").unlink()  # as if interrupted while writing shard 2
    (out / "shard-000002.json").unlink()
    summary = prepare_images(images, out, ImageSettings(short_side=64), samples_per_shard=2, progress=False)
    assert (summary.shards, summary.shards_kept, summary.written) == (4, 3, 7)
    assert (out / "manifest.json").read_text() == manifest
    assert all(p.stat().st_mtime_ns == times[p.name] for p in out.glob("shard-*") if "000002" not in p.name)
    with pytest.raises(ValueError, match="other settings"):
        prepare_images(images, out, ImageSettings(short_side=80), samples_per_shard=2, progress=False)


def test_prepare_data_command_and_helpers(tmp_path, capsys):
    assert main(["prepare-data", "--out", str(tmp_path), "--samples-per-shard", "4", "--video-short-side", "64",
                 "--workers", "1", "data.resolution=56"]) == 0
    printed = capsys.readouterr().out
    assert "16 files in, 16 written, 0 skipped" in printed and "2 files in, 2 written" in printed
    assert ShardSet.open(tmp_path / "images").settings["short_side"] == default_short_side(56) == 64
    assert default_short_side(224) == 256
    assert parse_size("1GB") == 10 ** 9 and parse_size("64k") == 64000
    assert main(["prepare-data", "--out", str(tmp_path / "x"), "--keyframe-interval", "2"]) == 2


def test_data_floor_imports_nothing_above_it():
    """arlow.data sits below pretrain/finetune/evaluation: importing all of it (in a fresh interpreter) loads none
    of them, and no import statement in its source - lazy ones inside functions included - names them."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import arlow.data

    above = ("arlow.pretrain", "arlow.finetune", "arlow.evaluation", "arlow.demos", "arlow.serving")
    files = sorted(Path(arlow.data.__file__).parent.glob("*.py"))
    modules = [f"arlow.data.{f.stem}" for f in files if f.stem != "__init__"]
    assert "arlow.data.prepare" in modules and "arlow.data.shards" in modules
    code = f"import sys\nfor m in {modules!r}: __import__(m)\n" \
           f"print(sorted(m for m in sys.modules if m.startswith({above!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    named = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                # resolve relative imports: level 1 is arlow.data, level 2 arlow
                base = ["arlow", "data"][: 3 - node.level] if node.level else []
                named.append((f.name, ".".join(base + [node.module or ""])))
            elif isinstance(node, ast.Import):
                named += [(f.name, a.name) for a in node.names]
    assert any(n == "arlow.processing.media" for _, n in named)  # the scan sees relative imports
    assert [(f, n) for f, n in named if n and n.startswith(above)] == []


def test_shuffle_order_and_deal():
    rng = np.random.default_rng(0)
    order = shuffle_order(1000, 50, rng)
    assert sorted(order.tolist()) == list(range(1000))
    assert all(order[t] < t + 50 for t in range(1000))  # a reader holds at most 50 samples
    assert (order != np.arange(1000)).mean() > 0.9
    shares = [deal(10, s, 3, np.arange(10)[::-1]) for s in range(3)]
    assert sorted(sum(shares, [])) == list(range(10)) and shares[0] == [9, 6, 3, 0]
    assert deal(2, 3, 5) == [1]


# ------------------------------------------------------------------------------------------------ streaming

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    images, videos = builtin_media()
    prepare_images(images, out / "images", ImageSettings(short_side=64), samples_per_shard=3, progress=False)
    prepare_videos(videos, out / "videos", VideoSettings(short_side=64), samples_per_shard=1, progress=False)
    return out


@pytest.fixture(scope="module")
def server(prepared):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(prepared)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_streaming_from_local_http_server_equals_local_and_trains(prepared, server, tmp_path):
    local = StreamingPretrainData(prepared / "images", prepared / "videos", shuffle_buffer=4, **SMALL)
    remote = StreamingPretrainData(f"{server}/images", f"{server}/videos", shuffle_buffer=4, **SMALL)
    expected = _batches(local, 6)
    _same(_batches(remote, 6), expected)
    assert any((b["grid_thw"][:, 0] > 1).any() for b in expected)  # clips were streamed too
    with pytest.raises(ValueError, match="cannot read manifest.json"):
        StreamingPretrainData(f"{server}/nothing-here", None, **SMALL)

    out = tmp_path / "run"
    code = main(["pretrain", "model.vision.embed_dim=64", "model.vision.hidden_size=64",
                 "model.decoder_hidden_size=64", "model.decoder_num_layers=1", "data.resolution=56",
                 "data.clip_frames=4", "data.tokens_per_batch=256", "data.num_workers=1",
                 f"data.images={server}/images", f"data.videos={server}/videos", "train.max_steps=3",
                 "train.save_every=3", "train.warmup_steps=1", "train.precision=fp32", "reconstruct.num_items=2",
                 f"train.output_dir={out}"])
    assert code == 0
    assert (out / "checkpoint-3" / "vision_encoder" / "model.safetensors").is_file()
    state = torch.load(out / "checkpoint-3" / "data_state_0.pt", weights_only=False)
    assert state["batches"] == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_shard_equals_the_uninterrupted_stream(prepared, workers):
    settings = dict(num_workers=workers, shuffle_buffer=5, **SMALL)
    full = _batches(StreamingPretrainData(prepared / "images", prepared / "videos", **settings), 9)
    first = StreamingPretrainData(prepared / "images", prepared / "videos", **settings)
    _same(_batches(first, 5), full[:5])
    state = first.state_dict()
    resumed = StreamingPretrainData(prepared / "images", prepared / "videos", **settings)
    resumed.load_state_dict(state)
    _same(_batches(resumed, 4), full[5:])
    other = StreamingPretrainData(prepared / "images", prepared / "videos",
                                  **{**settings, "num_workers": {0: 2, 2: 1}[workers]})  # other streams
    with pytest.raises(ValueError, match="streams"):
        other.load_state_dict(state)


def test_two_ranks_get_disjoint_complete_shares(tmp_path):
    images = [(_smooth(32, 32, seed=i), i) for i in range(23)]
    prepare_images(ImageList(images), tmp_path / "images", ImageSettings(short_side=32), samples_per_shard=3,
                   progress=False)
    shares, counts = [], []
    for rank in range(2):
        data = StreamingPretrainData(tmp_path / "images", None, rank=rank, world_size=2, **SMALL)
        batches = _batches(data, data.stream_batches(0, rank))  # one stream per rank: its epoch 0
        shares.append(torch.cat([b["labels"] for b in batches]).tolist())
        finite = StreamingPretrainData(tmp_path / "images", None, rank=rank, world_size=2, epochs=2,
                                       num_workers=2, **SMALL)
        got = list(finite)
        counts.append((len(got), sum(b["num_samples"] for b in got), finite.num_dropped))
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(23))
    # with a finite run every rank gets the same number of micro-batches; what is left out to equalise them is
    # counted: delivered + dropped = both epochs of every image
    assert counts[0][0] == counts[1][0] > 0 and counts[0][2] == counts[1][2]
    assert counts[0][1] + counts[1][1] + counts[0][2] == 2 * 23
    with pytest.raises(ValueError, match="8 shards but 10 streams"):
        StreamingPretrainData(tmp_path / "images", None, world_size=2, num_workers=5, **SMALL)


def test_streamed_samples_match_the_file_pipeline(tmp_path):
    """The streaming worker's own path (FFmpeg crop/scale, uint8 patchify) against PretrainData on the stored
    files: images to float rounding, clips within resampling differences (FFmpeg's bicubic vs Pillow's)."""
    prepare_images(ImageList([_smooth(70, 60, seed=1)]), tmp_path / "images", ImageSettings(short_side=60),
                   samples_per_shard=1, progress=False)
    y, x = np.mgrid[0:60, 0:80]
    moving = np.stack([np.stack([(x * 3 + 5 * k) % 256, (y * 4) % 256, (x + y + 9 * k) % 256], -1)
                       for k in range(12)]).astype(np.uint8)
    write_video(tmp_path / "v.mp4", moving, fps=10)
    prepare_videos([str(tmp_path / "v.mp4")], tmp_path / "videos", VideoSettings(short_side=60),
                   samples_per_shard=1, progress=False)
    [(image_entry, image_bytes)] = _all_samples(ShardSet.open(tmp_path / "images"))
    [(_, video_bytes)] = _all_samples(ShardSet.open(tmp_path / "videos"))
    (tmp_path / "stored.mp4").write_bytes(video_bytes)
    settings = dict(resolution=56, clip_frames=4, frame_stride=2, augment=False, shuffle=False)
    streamed = StreamingPretrainData(tmp_path / "images", tmp_path / "videos", **settings)
    files = PretrainData(ImageList([_decoded(image_bytes)]), [str(tmp_path / "stored.mp4")], **settings)
    rows, grid, _, _ = streamed.sample(IMAGE, 0)
    expected, expected_grid, _, _ = files.sample(IMAGE, 0)
    assert torch.equal(grid, expected_grid) and torch.allclose(rows, expected, atol=1e-5)
    rows, grid, _, _ = streamed.sample(VIDEO, 0)
    expected, expected_grid, _, _ = files.sample(VIDEO, 0)
    assert torch.equal(grid, expected_grid) and grid.tolist() == [2, 4, 4]
    assert (rows - expected).abs().mean() < 0.03 and rows.std() > 0.3


@pytest.mark.parametrize("streamed", [False, True])
def test_rows_normalised_on_the_device_equal_the_worker_path(prepared, streamed):
    """``normalise=False`` hands over uint8 rows and ``DeviceNormaliser`` (the MAE step's first op, on the training
    device: CUDA when there is one) makes them float: the same numbers as today's CPU path (raw files:
    ``frames_to_tensor`` then patchify; prepared shards: the worker's in-place cast) to float rounding, and as an
    independent float64 ``(x / 255 - mean) / std``. Same batches otherwise (order, grids, counts)."""
    from arlow.pretrain.pixels import DeviceNormaliser

    images, videos = builtin_media()
    settings = dict(num_workers=0, pin_memory=False, **SMALL)
    make = (lambda **kw: StreamingPretrainData(prepared / "images", prepared / "videos", **kw, **settings)) \
        if streamed else (lambda **kw: PretrainData(images, videos, **kw, **settings))
    cpu, raw = _batches(make(), 4), _batches(make(normalise=False), 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    normaliser = DeviceNormaliser(*image_normalisation())
    mean = torch.tensor(image_normalisation()[0], dtype=torch.float64).view(1, 3, 1)
    std = torch.tensor(image_normalisation()[1], dtype=torch.float64).view(1, 3, 1)
    assert sum(b["num_samples"] for b in raw) > 4 and any(b["grid_thw"][:, 0].max() > 1 for b in raw)  # clips too
    for want, got in zip(cpu, raw):
        assert got["pixel_values"].dtype == torch.uint8 and want["pixel_values"].dtype == torch.float32
        assert torch.equal(want["grid_thw"], got["grid_thw"]) and want["num_tokens"] == got["num_tokens"]
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in got.items()}
        on_device = normaliser(moved)["pixel_values"]
        assert on_device.device.type == device and on_device.dtype == torch.float32
        on_device = on_device.cpu()
        assert torch.allclose(on_device, want["pixel_values"], atol=1e-6, rtol=0)
        rows = got["pixel_values"].double().view(got["pixel_values"].shape[0], 3, -1)
        exact = ((rows / 255 - mean) / std).view(on_device.shape)
        assert (on_device.double() - exact).abs().max() < 1e-6
        assert normaliser({"pixel_values": want["pixel_values"]})["pixel_values"] is want["pixel_values"]  # floats pass
    with pytest.raises(ValueError, match="positive std"):
        DeviceNormaliser((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))


def test_micro_batch_normalisation_and_seeking_from_the_keyframe_interval(prepared):
    """The worker gathers a micro-batch's patch views (strided views of the uint8 frames; an image's a stride-0
    repeat of one frame) once into its final tensor, uint8 or cast and normalised in place: equal to patchify per
    sample, concatenating and normalising in float64. A prepared clip sought
    from the set's keyframe interval (1 s) gets the same frames as one decoded from the start."""
    from arlow.data.clips import read_clip
    from arlow.pretrain.packing import collate_items

    stream = StreamingPretrainData(prepared / "images", prepared / "videos", resolution=56, clip_frames=4,
                                   frame_stride=4, seed=0)
    worker = _StreamWorker(stream, 0)
    assert worker.seek_after == 1.0  # from the manifest's settings
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (3, 56, 28, 3), dtype=np.uint8)  # 3 frames: padded to 4 with the last one
    image = rng.integers(0, 256, (1, 28, 56, 3), dtype=np.uint8)  # one frame standing for Tp = 2
    views = [patch_view(f, 14, 2, 2) for f in (clip, image)]
    patches = []  # independently: patchify on (T, C, H, W) frames, Tp-padded / repeated as PretrainData does
    for frames in (torch.from_numpy(np.concatenate([clip, clip[-1:]])), torch.from_numpy(image).expand(2, -1, -1, -1)):
        rows, grid = patchify(frames.permute(0, 3, 1, 2), 14, 2, 2)
        patches.append(rows)
    assert [v[1].tolist() for v in views] == [[2, 4, 2], [1, 2, 4]]
    mean, std = torch.tensor(stream.mean).view(1, 3, 1), torch.tensor(stream.std).view(1, 3, 1)
    expected = torch.cat([((p.double().reshape(p.shape[0], 3, -1) / 255 - mean) / std).reshape(p.shape[0], -1)
                          for p in patches]).float()
    got = worker.assemble([v[0] for v in views])
    assert got.shape == (24, 3 * 2 * 196) and torch.allclose(got, expected, atol=1e-5)
    stream.normalise = False
    raw = _StreamWorker(stream, 0).assemble([v[0] for v in views])
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.cat(patches))
    batch = collate_items(got, [v[1] for v in views])
    assert batch["num_samples"] == 2 and batch["num_tokens"] == 24 and batch["pixel_values"] is got
    with pytest.raises(ValueError, match="24 patch rows for grids holding 16"):
        collate_items(got, [torch.tensor([1, 4, 4])])

    [(entry, data)] = _all_samples(ShardSet.open(prepared / "videos"))[:1]
    late = 0
    for seed in range(12):
        frames = {}
        for seek_after in (worker.seek_after, 1e9):  # 1e9: never seek
            frames[seek_after], indices = read_clip(io.BytesIO(data), 4, stride=4,
                                                    rng=np.random.default_rng(seed), seek_after=seek_after,
                                                    convert=lambda f: f.to_ndarray(format="rgb24"))
        late += indices[0] / entry["fps"] > 1.0
        assert all(np.array_equal(a, b) for a, b in zip(frames[1.0], frames[1e9])), seed
    assert late >= 3  # the check covered clips that were sought
