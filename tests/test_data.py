"""MAE pretraining data: sources, clips, augmentation, token-budget packing, workers, resume, sharding, bad files.

Every image, shard, dataset and video is made here in a tmp dir (Pillow, PyAV, webdataset, datasets); the
built-in media are the only shipped files read. Tiny sizes: 56 px crops (16 patches per image).
"""

import io
import itertools
import logging
import os
import random

import av
import numpy as np
import pytest
import torch
from PIL import Image

from arlow.configuration import ArlowVisionConfig
from arlow.data.augment import random_resized_crop_box
from arlow.data.clips import clip_indices, probe_video, read_clip, read_frames
from arlow.data.augment import image_normalisation
from arlow.data.sources import builtin_media
from arlow.pretrain.data import IMAGE, VIDEO, PretrainData
from arlow.pretrain.packing import pack_by_budget
from arlow.data.sources import HFImageDataset, ImageList, TarShards, VideoList, image_source, video_source
from arlow.processing.patches import patchify, unpatchify
from media import write_vfr_video

RES = 56  # 2x2 merge windows of 14 px patches: 16 patch rows per image
P, TP, S = 14, 2, 2
IMAGE_ROWS = (RES // P) ** 2


# ------------------------------------------------------------------------------------------------ media makers

def _noise_image(seed, size=(72, 64)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_images(folder, count, start=0, ext="png", size=(72, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:03d}.{ext}"
        _noise_image(i, size).save(path)
        paths.append(str(path))
    return paths


def _level(k):
    return 10 + (6 * k) % 240  # frame k of a test video is a flat grey of this level (recoverable after lossless H.264)


def _write_video(path, num_frames, size=(64, 48), fps=10, frame_fn=None, faststart=False, codec="libx264"):
    """Lossless H.264 (crf 0): flat grey frames numbered by level, or ``frame_fn(k) -> (H, W, 3) uint8``."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"} if codec == "libx264" else {"qscale": "1"}
        stream.codec_context.bit_rate = 4_000_000  # near-lossless for the codecs that are not
        stream.codec_context.gop_size = 8
        for k in range(num_frames):
            array = frame_fn(k) if frame_fn else np.full((size[1], size[0], 3), _level(k), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _frame_number(image):
    return int(round((np.asarray(image, dtype=np.float64).mean() - 10) / 6))


def _normalised(array):
    mean, std = image_normalisation()
    x = torch.from_numpy(np.asarray(array, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _take(data, n):
    return list(itertools.islice(iter(data), n))


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["grid_thw"], y["grid_thw"])
        assert x["num_tokens"] == y["num_tokens"] and x["num_samples"] == y["num_samples"]
        if "labels" in x:
            assert torch.equal(x["labels"], y["labels"])


def _ids(batches):
    return [int(v) for b in batches for v in b["labels"]]


@pytest.fixture(scope="module")
def numbered_images(tmp_path_factory):
    """20 noise PNGs, each labelled with its own number (so batches tell which images they hold)."""
    paths = _write_images(tmp_path_factory.mktemp("numbered"), 20)
    return [(p, i) for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return [_write_video(folder / f"clip_{i}.mp4", 30 + 10 * i) for i in range(3)]


# ------------------------------------------------------------------------------------------------ packing

def test_pack_by_budget_keeps_order_budget_and_every_sample():
    rng = random.Random(0)
    for _ in range(200):
        budget = rng.randint(1, 40)
        costs = [rng.randint(1, 50) for _ in range(rng.randint(0, 30))]
        groups = pack_by_budget(costs, budget)
        assert [i for g in groups for i in g] == list(range(len(costs)))  # order kept, nothing dropped or doubled
        for g, nxt in zip(groups, groups[1:] + [None]):
            total = sum(costs[i] for i in g)
            assert total <= budget or len(g) == 1  # only a lone oversized sample may exceed the budget
            if nxt is not None:  # greedy: the next sample did not fit
                assert total + costs[nxt[0]] > budget


def test_pack_by_budget_examples_and_errors():
    assert pack_by_budget([256] * 16 + [2048], 4096) == [list(range(16)), [16]]
    assert pack_by_budget([10, 100, 10], 50) == [[0], [1], [2]]  # oversized sample alone, not dropped
    with pytest.raises(ValueError, match="budget"):
        pack_by_budget([1], 0)
    with pytest.raises(ValueError, match="cost"):
        pack_by_budget([3, 0], 10)


def test_micro_batches_respect_token_budget_and_oversized_warns_once(numbered_images, videos, caplog):
    with caplog.at_level(logging.WARNING, logger="arlow.pretrain.data"):
        data = PretrainData(numbered_images, videos, resolution=RES, clip_frames=8, frame_stride=1,
                            tokens_per_batch=48, video_prob=0.4, seed=1, epochs=1)
    assert sum("micro-batch of their own" in r.message for r in caplog.records) == 1
    clip_rows = 4 * IMAGE_ROWS  # 8 frames -> 4 temporal patches
    kinds, _ = data.epoch_samples(0)
    batches = list(data)
    assert sum(b["num_samples"] for b in batches) == len(kinds)  # every planned sample arrives
    for b in batches:
        assert b["pixel_values"].shape == (b["num_tokens"], 3 * TP * P * P)
        assert b["num_tokens"] == int(b["grid_thw"].prod(-1).sum())
        assert b["num_tokens"] <= 48 or (b["num_samples"] == 1 and b["num_tokens"] == clip_rows)
    assert any(b["num_tokens"] == clip_rows for b in batches)


# ------------------------------------------------------------------------------------------------ sources

def _check_image_source(source, expected_arrays, expected_labels):
    assert len(source) == len(expected_arrays)
    for i, array in enumerate(expected_arrays):
        assert np.array_equal(np.asarray(source.load(i)), array)
    assert source.labels == expected_labels


def test_image_folder_imagenet_layout_and_flat(tmp_path):
    root = tmp_path / "imagenet"
    _write_images(root / "b_class", 2, start=0)
    _write_images(root / "a_class", 3, start=2)
    (root / "a_class" / "notes.txt").write_text("not an image")
    source = ImageList.from_folder(root)
    assert source.classes == ["a_class", "b_class"]
    # sorted walk: a_class (images 2, 3, 4) then b_class (images 0, 1)
    expected = [np.asarray(_noise_image(i, (72, 64))) for i in (2, 3, 4, 0, 1)]
    _check_image_source(source, expected, [0, 0, 0, 1, 1])

    flat = tmp_path / "flat"
    _write_images(flat, 3)
    source = image_source(str(flat))
    _check_image_source(source, [np.asarray(_noise_image(i, (72, 64))) for i in range(3)], None)


def test_image_list_of_paths_and_in_memory_images_with_labels(tmp_path):
    path = _write_images(tmp_path, 1)[0]
    source = ImageList([(path, 7), (_noise_image(5), 3), (np.asarray(_noise_image(6)), 1)])
    _check_image_source(source, [np.asarray(_noise_image(i)) for i in (0, 5, 6)], [7, 3, 1])
    with pytest.raises(ValueError, match="label"):
        ImageList([(path, 1), path])


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [_noise_image(i) for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    source = image_source(str(tmp_path / "hf"))
    assert isinstance(source, HFImageDataset) and source.classes == ["x", "y"]
    _check_image_source(source, [np.asarray(im) for im in images], [0, 1, 1, 0])
    nolabel = HFImageDataset(tmp_path / "hf", label_column=None)
    assert nolabel.labels is None
    with pytest.raises(ValueError, match="no column 'pixels'"):
        HFImageDataset(tmp_path / "hf", image_column="pixels")


def test_webdataset_tar_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    arrays = []
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"data-{shard:03d}.tar")) as sink:
            for j in range(3):
                image = _noise_image(10 * shard + j)
                arrays.append(np.asarray(image))
                if j == 1:  # webp members (lossless here, so the pixels compare exactly)
                    buffer = io.BytesIO()
                    image.save(buffer, format="WEBP", lossless=True)
                    sink.write({"__key__": f"s{shard}_{j:02d}", "webp": buffer.getvalue(), "cls": shard})
                else:
                    sink.write({"__key__": f"s{shard}_{j:02d}", "png": image, "cls": shard})
    source = image_source(str(tmp_path / "data-{000..001}.tar"))
    assert isinstance(source, TarShards) and len(source) == 6
    assert source.labels == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        assert np.array_equal(np.asarray(source.load(i)), arrays[i])
    assert source.name(0).endswith("data-000.tar:s0_00.png")
    assert len(image_source(str(tmp_path))) == 6  # a folder of shards


def test_video_folder_and_list_file(tmp_path):
    root = tmp_path / "ucf"
    (root / "Jump").mkdir(parents=True)
    (root / "Archery").mkdir()
    _write_video(root / "Jump" / "v_1.mp4", 12)
    _write_video(root / "Archery" / "v_2.avi", 12, codec="mpeg4")  # UCF101 ships AVI (MPEG-4 part 2)
    source = VideoList.from_folder(root)
    assert source.classes == ["Archery", "Jump"] and source.labels == [0, 1]
    assert source.paths[0].endswith("Archery/v_2.avi")
    frames, indices = source.load_clip(0, 4, stride=3, rng=np.random.default_rng(0))
    assert np.all(np.diff(indices) == 3) and [_frame_number(f) for f in frames] == indices

    listing = tmp_path / "train.txt"
    listing.write_text("# comment\nucf/Jump/v_1.mp4 5\n\nucf/Archery/v_2.avi, 3\n")
    listed = video_source(str(listing))
    assert listed.labels == [5, 3] and listed.paths[0] == str(tmp_path / "ucf/Jump/v_1.mp4")
    unlabelled = tmp_path / "test.txt"
    unlabelled.write_text(f"{root}/Jump/v_1.mp4\n")
    assert VideoList.from_list_file(unlabelled).labels is None


def test_each_source_form_feeds_the_pipeline(tmp_path, videos):
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for j in range(3):
            sink.write({"__key__": f"k{j}", "jpg": _noise_image(j), "cls": j})
    _write_images(tmp_path / "tree" / "c0", 2)
    for images in (str(tmp_path / "shard.tar"), str(tmp_path / "tree")):
        data = PretrainData(images, videos, resolution=RES, clip_frames=4, tokens_per_batch=64, video_prob=0.5,
                            seed=3, epochs=1)
        batches = list(data)
        assert sum(b["num_samples"] for b in batches) == len(data.epoch_samples(0)[0])
        assert all("labels" not in b for b in batches)  # the videos have no labels
    labelled = PretrainData(str(tmp_path / "shard.tar"), resolution=RES, tokens_per_batch=64, epochs=1)
    assert sorted(_ids(list(labelled))) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ clips

def test_clip_frames_follow_stride_and_fps(tmp_path):
    path = _write_video(tmp_path / "count.mp4", 40, fps=10)
    assert tuple(probe_video(path)) == (40, 10.0)
    for seed in range(4):
        frames, indices = read_clip(path, 6, stride=3, rng=np.random.default_rng(seed))
        assert len(frames) == 6 and np.all(np.diff(indices) == 3) and 0 <= indices[0] and indices[-1] < 40
        assert [_frame_number(f) for f in frames] == indices  # the decoded pixels are those frames
    frames, indices = read_clip(path, 5, fps=2.5, rng=np.random.default_rng(0))  # 10 fps video -> every 4th
    assert np.all(np.diff(indices) == 4) and [_frame_number(f) for f in frames] == indices
    frames, indices = read_clip(path, 4, stride=2, rng=None)  # unaugmented: the centred clip
    assert indices == [16, 18, 20, 22] and [_frame_number(f) for f in frames] == indices
    # late frames are reached by seeking to a keyframe (every 8th here), not decoding from the start
    seeked = read_frames(path, [37, 25, 30, 25])
    assert [_frame_number(f) for f in seeked] == [37, 25, 30, 25]
    for a, b in zip(seeked, read_frames(path, [37, 25, 30, 25], seek=False)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # too short for the stride: spread over the whole video, same frame count
    assert clip_indices(10, 10.0, 4, stride=5) == [0, 3, 6, 9]
    assert len(clip_indices(3, 10.0, 8, stride=1)) == 8
    with pytest.raises(ValueError, match="exactly one"):
        clip_indices(10, 10.0, 4, stride=2, fps=5.0)


def test_clip_has_the_same_crop_in_every_frame(tmp_path):
    texture = np.asarray(_noise_image(42, (96, 80)))
    path = _write_video(tmp_path / "static.mp4", 12, size=(96, 80), frame_fn=lambda k: texture)
    data = PretrainData(videos=[path], resolution=RES, clip_frames=6, frame_stride=2, tokens_per_batch=1000,
                        seed=0, epochs=4)
    crops = []
    for batch in data:
        frames = unpatchify(batch["pixel_values"], batch["grid_thw"][0], P, TP, S)
        assert frames.shape == (6, 3, RES, RES)
        for f in frames[1:]:  # a static video: every frame of the clip must be cropped and flipped alike
            assert torch.equal(f, frames[0])
        crops.append(frames[0])
    assert not all(torch.equal(c, crops[0]) for c in crops[1:])  # ... while the crop changes between samples


def test_random_resized_crop_box_statistics():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(400, 300, rng)
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        areas.append((right - left) * (bottom - top) / 120000)
        ratios.append((right - left) / (bottom - top))
    assert min(areas) >= 0.19 and max(areas) <= 1.0 and 0.45 < np.mean(areas) < 0.65
    assert min(ratios) >= 0.74 and max(ratios) <= 1.34


def test_unaugmented_image_rows_equal_patchify_of_normalised_image(tmp_path):
    pil = _noise_image(7, (RES, RES))
    pil.save(tmp_path / "x.png")
    data = PretrainData([str(tmp_path / "x.png")], resolution=RES, augment=False, epochs=1)
    (batch,) = list(data)
    x = _normalised(pil).unsqueeze(0).repeat(TP, 1, 1, 1)  # an image is Tp identical frames
    rows, grid = patchify(x, P, TP, S)
    assert torch.equal(batch["grid_thw"], grid.unsqueeze(0))
    assert torch.allclose(batch["pixel_values"], rows, atol=1e-6)
    # independent check of one row: patch (0, 0) of the first merge window is the top-left 14x14 block
    assert torch.allclose(batch["pixel_values"][0].view(3, TP, P, P)[:, 0], x[0, :, :P, :P], atol=1e-6)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


# ------------------------------------------------------------------------------------------------ mixing

def test_mixing_is_per_sample_and_every_image_is_used_once_per_epoch():
    fake = ImageList([f"/nonexistent/{i}.jpg" for i in range(4000)])  # planning never decodes
    vids = VideoList([f"/nonexistent/{i}.mp4" for i in range(7)])
    data = PretrainData(fake, vids, video_prob=0.25, seed=5, check_sources=False)
    kinds, indices = data.epoch_samples(0)
    assert sorted(indices[kinds == IMAGE].tolist()) == list(range(4000))
    assert abs((kinds == VIDEO).mean() - 0.25) < 0.02
    again = PretrainData(fake, vids, video_prob=0.25, seed=5, check_sources=False).epoch_samples(0)
    assert np.array_equal(again[0], kinds) and np.array_equal(again[1], indices)
    other = data.epoch_samples(1)
    assert not np.array_equal(other[1][: 100], indices[: 100])
    assert (PretrainData(fake, vids, video_prob=0.0, check_sources=False).epoch_samples(0)[0] == IMAGE).all()
    with pytest.raises(ValueError, match="video_prob"):
        PretrainData(fake, vids, video_prob=1.5, check_sources=False)


def test_variable_frame_rate_video_is_sampled_by_presentation_time(tmp_path):
    """2 s at 10 fps, then 5 s at 2 fps: a 1-frame-per-second clip must show what is on screen at each second
    (a frame-index rule picks later frames in the slow half)."""
    starts_ms = [100 * k for k in range(20)] + [2000 + 500 * k for k in range(10)]
    levels = np.stack([np.full((48, 64, 3), _level(k), np.uint8) for k in range(len(starts_ms))])
    path = write_vfr_video(tmp_path / "vfr.mp4", levels, starts_ms)
    info = probe_video(path)
    frames, indices = read_clip(path, 7, fps=1.0)
    seconds = [i / info.fps for i in indices]  # index i is the moment i / fps
    on_screen = [max(k for k, start in enumerate(starts_ms) if start <= 1000 * t + 1e-6) for t in seconds]
    assert [_frame_number(f) for f in frames] == on_screen
    assert seconds[-1] - seconds[0] == pytest.approx(6.0, abs=0.5 / info.fps)  # 7 frames 1 s apart in real time


# ------------------------------------------------------------------------------------- workers, resume, ranks

def test_same_batches_with_zero_and_two_workers(numbered_images, videos, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    items = numbered_images[:8] + [(str(bad), 99)] + numbered_images[8:12]
    kw = dict(resolution=RES, clip_frames=4, tokens_per_batch=64, video_prob=0.3, seed=2, epochs=2)
    serial = PretrainData(items, videos, **kw, num_workers=0)
    parallel = PretrainData(items, videos, **kw, num_workers=2)
    a, b = list(serial), list(parallel)
    _same_batches(a, b)
    assert serial.num_skipped == parallel.num_skipped == 2  # the bad file, once per epoch, seen in the workers
    assert str(bad) in parallel.skipped_files


def test_resume_continues_exactly(numbered_images, videos):
    kw = dict(resolution=RES, clip_frames=4, tokens_per_batch=64, video_prob=0.3, seed=4)
    first = PretrainData(numbered_images, videos, **kw)
    total = first.epoch_size(0) + 4  # the continuation crosses an epoch boundary
    full = _take(PretrainData(numbered_images, videos, **kw), total)
    iterator = iter(first)
    head = [next(iterator) for _ in range(5)]
    state = first.state_dict()
    _same_batches(head, full[:5])
    resumed = PretrainData(numbered_images, videos, **kw, num_workers=2)
    resumed.load_state_dict(torch.load(_roundtrip(state), weights_only=False))
    _same_batches(_take(resumed, total - 5), full[5:])
    # calling iter() again continues too (no restart at epoch 0)
    _same_batches(_take(first, 2), full[5:7])
    changed = PretrainData(numbered_images, videos, **{**kw, "tokens_per_batch": 80})
    with pytest.raises(ValueError, match="tokens_per_batch"):
        changed.load_state_dict(state)


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_ranks_get_disjoint_complete_interleaved_shares(numbered_images):
    kw = dict(resolution=RES, tokens_per_batch=2 * IMAGE_ROWS, seed=9, epochs=1)  # 2 images per micro-batch
    single = list(PretrainData(numbered_images, **kw))
    assert len(single) == 10 and sorted(_ids(single)) == list(range(20))
    for world in (2, 5):
        shares = [list(PretrainData(numbered_images, **kw, rank=r, world_size=world)) for r in range(world)]
        for r, share in enumerate(shares):
            _same_batches(share, single[r::world])
        ids = [i for share in shares for i in _ids(share)]
        assert sorted(ids) == list(range(20))  # disjoint and complete
    # 10 micro-batches over 4 ranks: every rank gets 3 (two borrowed from the next epoch), none hangs short
    shares = [list(PretrainData(numbered_images, **kw, rank=r, world_size=4)) for r in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 3]
    ids = [i for s in shares for b in s[:2] for i in _ids([b])] + _ids([shares[0][2], shares[1][2]])
    assert sorted(ids) == list(range(20))
    # the global position is the same on every rank, so a run may resume with another world size
    a = PretrainData(numbered_images, **kw, rank=1, world_size=2)
    _take(a, 2)
    b = PretrainData(numbered_images, **kw)
    b.load_state_dict(a.state_dict())
    _same_batches(_take(b, 2), single[4:6])


# ------------------------------------------------------------------------------------------------ bad files

def test_corrupt_truncated_and_empty_files_are_skipped_counted_and_logged(tmp_path, caplog):
    folder = tmp_path / "imgs"
    good = _write_images(folder, 4, ext="jpg")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 garbage that is not a jpeg")
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(open(good[0], "rb").read()[:300])
    vdir = tmp_path / "vids"
    vdir.mkdir()
    ok_video = _write_video(vdir / "ok.mp4", 20)
    cut = _write_video(vdir / "cut.mp4", 40, faststart=True)  # header first: opens, then the data ends
    with open(cut, "r+b") as handle:
        handle.truncate(os.path.getsize(cut) // 2)
    (vdir / "zero.mp4").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="arlow.pretrain.data"):
        data = PretrainData(str(folder), str(vdir), resolution=RES, clip_frames=4, frame_stride=2,
                            tokens_per_batch=64, video_prob=0.5, seed=0, epochs=3, shuffle=False)
        plan = [len(data.epoch_samples(e)[0]) for e in range(3)]
        batches = list(data)
    assert sum(b["num_samples"] for b in batches) == sum(plan)  # no holes: replaced, not dropped
    bad = {str(corrupt), str(empty), str(truncated), cut, str(vdir / "zero.mp4")}
    assert set(data.skipped_files) == bad
    messages = [r.getMessage() for r in caplog.records if "skipped unreadable" in r.getMessage()]
    assert len(messages) == data.num_skipped_files == len(bad) and data.num_skipped >= len(bad)  # logged once each
    for path in bad:
        assert any(path in m for m in messages)
    assert "0 bytes" in data.skipped_files[str(empty)] and "truncated" in data.skipped_files[str(truncated)]
    assert ok_video not in data.skipped_files


def test_a_file_found_unreadable_is_not_decoded_again(numbered_images, tmp_path, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    items = numbered_images[:6] + [(str(bad), 99)]
    kw = dict(resolution=RES, tokens_per_batch=64, seed=3, epochs=3, check_sources=False)
    reference = list(PretrainData(items, **kw))
    data = PretrainData(items, **kw)
    decoded = []
    load = type(data.images).load
    monkeypatch.setattr(type(data.images), "load", lambda self, i: decoded.append(i) or load(self, i))
    first = _take(data, 2)  # epoch 0 (7 images, 4 per micro-batch) meets the bad file
    state = data.state_dict()
    resumed = PretrainData(items, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    _same_batches(first + rest, reference)  # replaced by the same item as when it is decoded each time
    assert decoded.count(6) == 1  # three epochs, one decode: the resumed pipeline knew it from the state
    assert data.num_skipped == 1 and resumed.num_skipped == 3 and set(resumed.skipped_files) == {str(bad)}


def test_a_missing_data_path_says_it_does_not_exist(tmp_path):
    for spec, kind in ((tmp_path / "nope", "image"), (tmp_path / "nope.jpg", "image"), (tmp_path / "nope.mp4", "video"),
                       (tmp_path / "videos", "video"), (tmp_path / "list.txt", "video")):
        make = image_source if kind == "image" else video_source
        with pytest.raises(ValueError, match=f"{kind} source {spec} does not exist"):
            make(str(spec))


def test_empty_folder_and_unreadable_source_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no image files found under .*empty.*\.jpg, \.jpeg, \.png"):
        PretrainData(str(empty))
    with pytest.raises(ValueError, match=r"no video files found under .*\.mp4, \.avi"):
        PretrainData(videos=str(empty))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"nope")
    (tmp_path / "bad" / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 2 files .* could be read"):
        PretrainData(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="multiple of patch_size\\*spatial_merge_size = 28; got 200, try 196"):
        PretrainData(str(tmp_path / "bad"), resolution=200, check_sources=False)
    with pytest.raises(ValueError, match="multiple of .* = 32"):
        PretrainData([str(tmp_path / "x.jpg")], resolution=56, check_sources=False,
                     vision_config=ArlowVisionConfig(patch_size=16, depth=2, embed_dim=32, num_heads=2))


# ------------------------------------------------------------------------------------------------ built-in media

def test_builtin_media_loads_and_trains_the_demo():
    images, videos = builtin_media()
    assert len(images) >= 10 and len(videos) >= 1
    root = os.path.dirname(os.path.dirname(images[0]))
    assert os.path.isfile(os.path.join(root, "LICENSES.md"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    assert total < 3_000_000
    for path in images:
        with Image.open(path) as im:
            assert max(im.size) <= 320
    for path in videos:
        frames, _ = probe_video(path)
        assert frames >= 32
    data = PretrainData.builtin(resolution=RES, clip_frames=16, frame_stride=2, video_prob=0.5, seed=0, epochs=1)
    batches = list(data)
    grids = torch.cat([b["grid_thw"] for b in batches])
    assert (grids[:, 0] == 8).any() and (grids[:, 0] == 1).sum() == len(images)
    assert data.num_skipped == 0
