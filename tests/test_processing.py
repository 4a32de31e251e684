"""Processors: resize rules, patch rows against direct slicing, image modes, video sampling and padding,
placeholder expansion, chat template, bad inputs, save/load. All media are generated here (Pillow, PyAV)."""

import base64
import json
import math

import numpy as np
import pytest
import torch
from media import (frame_index, level_frames, png_bytes, random_rgb, with_exif_orientation, write_vfr_video,
                   write_video)
from PIL import Image

import arlow  # noqa: F401  (registers the Auto classes)
from arlow.configuration import ArlowConfig
from arlow.processing import (
    ArlowImageProcessor,
    ArlowProcessor,
    ArlowTokenizerFast,
    ArlowVideoProcessor,
    MediaDecodeError,
    MediaNotFoundError,
    load_default_tokenizer,
    load_image,
    load_video,
    smart_resize,
)
from arlow.processing.patches import unpatchify
from arlow.processing.tokenizer import default_tokenizer_dir

SMALL = 28 * 28 * 16  # at most 16 merged tokens per image/frame: keeps every test tiny


def normalised(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1], written out independently of the processor."""
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def expected_rows(image_chw: np.ndarray, patch: int = 14, merge: int = 2, tp: int = 2) -> np.ndarray:
    """Patch rows by explicit slicing: merge windows in raster order, the 2x2 patches of a window in raster
    order, each row (C, Tp, P, P) with the image repeated over Tp."""
    _, height, width = image_chw.shape
    rows = []
    for hb in range(height // (patch * merge)):
        for wb in range(width // (patch * merge)):
            for dh in range(merge):
                for dw in range(merge):
                    y, x = (hb * merge + dh) * patch, (wb * merge + dw) * patch
                    block = image_chw[:, y:y + patch, x:x + patch]
                    rows.append(np.stack([block] * tp, axis=1).reshape(-1))
    return np.stack(rows)


@pytest.fixture(scope="module")
def processor():
    return ArlowProcessor.from_default(min_pixels=28 * 28, max_pixels=SMALL)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """13 frames at 10 fps (1.3 s), frame i a flat level 10 + 20 i."""
    return write_video(tmp_path_factory.mktemp("video") / "levels.mp4", level_frames(13), fps=10)


# ----------------------------------------------------------------------------------------------- smart_resize

@pytest.mark.parametrize("size, expected", [((224, 224), (224, 224)), ((561, 278), (560, 280)),
                                            ((1000, 500), (1008, 504)), ((4000, 3000), (1148, 840))])
def test_smart_resize_known_values(size, expected):
    assert smart_resize(*size) == expected


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (13, 400), (27, 29), (1, 200), (200, 1), (31, 639), (639, 31),
                                  (10000, 8000), (60, 12000), (5000, 25), (100, 150), (28, 28)])
def test_smart_resize_invariants(size):
    for low, high in [(56 * 56, 28 * 28 * 1280), (28 * 28, 28 * 28 * 4), (28 * 28 * 4, 28 * 28 * 4)]:
        h, w = smart_resize(*size, min_pixels=low, max_pixels=high)
        assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
        assert h * w <= high
    h, w = smart_resize(*size)  # default bounds are far apart: both hold
    assert 56 * 56 <= h * w <= 28 * 28 * 1280


def test_smart_resize_keeps_aspect_and_bounds_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        short = int(rng.integers(280, 3000))
        long_ = int(short * rng.uniform(1, 4))
        height, width = (short, long_) if rng.random() < 0.5 else (long_, short)
        h, w = smart_resize(height, width)
        assert 56 * 56 <= h * w <= 28 * 28 * 1280
        assert abs(math.log((h / w) / (height / width))) < 0.1


def test_smart_resize_rejects_bad_requests():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="must not exceed"):
        smart_resize(100, 100, min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="single merge window"):
        smart_resize(100, 100, min_pixels=1, max_pixels=500)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 100)


# ----------------------------------------------------------------------------------------------- images

def test_patch_rows_equal_direct_slicing_of_resized_image():
    proc = ArlowImageProcessor(min_pixels=28 * 28, max_pixels=SMALL)
    first, second = random_rgb(50, 75, seed=1), random_rgb(40, 33, seed=2)
    out = proc([Image.fromarray(first), second], return_tensors="pt")
    pieces, offset = [], 0
    for rgb in (first, second):
        h, w = smart_resize(*rgb.shape[:2], min_pixels=28 * 28, max_pixels=SMALL)
        resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=Image.BICUBIC))
        rows = expected_rows(normalised(resized))
        got = out["pixel_values"][offset:offset + len(rows)].numpy()
        np.testing.assert_allclose(got, rows, atol=1e-6)
        offset += len(rows)
        pieces.append([1, h // 14, w // 14])
    assert out["pixel_values"].shape == (offset, 1176)  # concatenated, no padding rows
    assert out["image_grid_thw"].tolist() == pieces
    assert out["image_grid_thw"].dtype == torch.int64
    assert proc.get_number_of_image_patches(50, 75) == pieces[0][1] * pieces[0][2]


def test_image_sources_give_identical_pixels(tmp_path):
    rgb = random_rgb(56, 84, seed=3)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    data = png_bytes(Image.fromarray(rgb))
    sources = [rgb, torch.from_numpy(rgb), rgb.transpose(2, 0, 1), Image.fromarray(rgb), str(path), path,
               f"file://{path}", data, "data:image/png;base64," + base64.b64encode(data).decode(),
               base64.b64encode(data).decode()]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(load_image(source)), rgb)
    proc = ArlowImageProcessor()
    reference = proc(rgb)["pixel_values"]
    np.testing.assert_array_equal(proc(str(path))["pixel_values"], reference)
    np.testing.assert_allclose(reference, expected_rows(normalised(rgb)), atol=1e-6)  # 56x84 is kept as is


def test_image_modes_convert_to_rgb():
    gray = np.arange(56 * 56, dtype=np.uint8).reshape(56, 56)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(gray, "L"))), np.stack([gray] * 3, -1))

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent -> white
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()

    la = Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(load_image(la)) == 255).all()

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert (np.asarray(load_image(palette)) == [10, 20, 30]).all()
    palette.info["transparency"] = 1
    assert (np.asarray(load_image(palette)) == 255).all()

    sixteen = Image.fromarray(np.array([[0, 65535], [257 * 100, 257 * 7]], np.uint16))
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(load_image(sixteen))[..., 0], [[0, 255], [100, 7]])
    as_int32 = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(as_int32))[..., 1], [[0, 255]])

    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # no black, full magenta + yellow = red
    assert (np.asarray(load_image(cmyk)) == [255, 0, 0]).all()

    # the processor takes them all and yields the same 3-channel rows as the RGB version
    proc = ArlowImageProcessor()
    np.testing.assert_array_equal(proc(Image.fromarray(gray, "L"))["pixel_values"],
                                  proc(np.stack([gray] * 3, -1))["pixel_values"])


def test_exif_orientation_is_applied():
    rgb = random_rgb(28, 56, seed=4)  # 28 high, 56 wide as stored
    upright = np.rot90(rgb, k=-1)  # orientation 6: display rotated 90 degrees clockwise
    tagged = with_exif_orientation(Image.fromarray(rgb), 6)
    np.testing.assert_array_equal(np.asarray(load_image(tagged)), upright)
    out = ArlowImageProcessor(min_pixels=28 * 28)(tagged)
    assert out["image_grid_thw"].tolist() == [[1, 4, 2]]
    np.testing.assert_allclose(out["pixel_values"], expected_rows(normalised(np.ascontiguousarray(upright))),
                               atol=1e-6)


def test_do_convert_rgb_false_rejects_non_rgb():
    proc = ArlowImageProcessor(do_convert_rgb=False)
    with pytest.raises(ValueError, match="do_convert_rgb"):
        proc(Image.new("L", (56, 56)))
    assert proc(Image.new("RGB", (56, 56)))["pixel_values"].shape == (16, 1176)


def test_pixel_bounds_per_call_and_fork_size_keys():
    proc = ArlowImageProcessor()
    image = random_rgb(300, 450)
    assert proc(image, max_pixels=28 * 28 * 4)["image_grid_thw"].tolist() == [[1, 2, 4]]
    fork = ArlowImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 4})
    assert (fork.min_pixels, fork.max_pixels) == (28 * 28, 28 * 28 * 4)
    assert fork(image)["image_grid_thw"].tolist() == [[1, 2, 4]]
    bounds = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4}
    assert proc(image, size=bounds)["image_grid_thw"].tolist() == [[1, 2, 4]]
    assert proc.max_pixels == 28 * 28 * 1280  # per-call settings do not stick
    # a preprocessor_config.json written by the reference fork: bounds in `size`, nulls, pan-and-scan keys
    fork_saved = {"size": {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 4}, "min_pixels": None,
                  "max_pixels": None, "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
                  "image_processor_type": "ArlowImageProcessorFast"}
    loaded = ArlowImageProcessor(**fork_saved)
    assert (loaded.min_pixels, loaded.max_pixels) == (28 * 28, 28 * 28 * 4)
    assert "pan_and_scan_min_crop_size" not in loaded.to_dict()
    video = ArlowVideoProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 4}, sample_strategy="uniform",
                                motion_threshold=0.1, min_frames=4)
    assert (video.min_pixels, video.max_pixels) == (28 * 28, 28 * 28 * 4)


# ----------------------------------------------------------------------------------------------- videos

def test_video_from_path_array_tensor_and_images(clip_path):
    frames = level_frames(13)
    decoded, meta = load_video(clip_path)
    assert decoded.shape == (13, 48, 64, 3) and meta.fps == 10 and meta.total_frames == 13
    assert [frame_index(f) for f in decoded] == list(range(13))
    assert meta.timestamps == pytest.approx([i / 10 for i in range(13)])

    proc = ArlowVideoProcessor(min_pixels=28 * 28, max_pixels=SMALL)
    from_array = proc(frames, return_tensors="pt")
    for other in (torch.from_numpy(frames), [Image.fromarray(f) for f in frames], list(frames)):
        out = proc(other, return_tensors="pt")
        assert torch.equal(out["pixel_values_videos"], from_array["pixel_values_videos"])
        assert torch.equal(out["video_grid_thw"], from_array["video_grid_thw"])
    from_file = proc(str(clip_path), return_tensors="pt")
    assert torch.equal(from_file["video_grid_thw"], from_array["video_grid_thw"])
    assert from_file["video_grid_thw"].tolist() == [[7, 4, 4]]  # 13 frames -> 14 (padded) -> 7 temporal patches
    torch.testing.assert_close(from_file["pixel_values_videos"], from_array["pixel_values_videos"], atol=0.05, rtol=0)
    assert from_file["second_per_grid_ts"].tolist() == pytest.approx([0.2])  # 2 frames of 0.1 s each


def test_video_sampling_by_count_fps_and_cap(clip_path):
    frames, meta = load_video(clip_path, num_frames=4)
    assert meta.frames_indices == [1, 4, 8, 11]  # centres of 4 equal segments of 13 frames
    assert [frame_index(f) for f in frames] == meta.frames_indices

    frames, meta = load_video(clip_path, fps=5)  # 1.3 s at 5 fps -> 6 frames, one every 0.2 s
    assert meta.frames_indices == [1, 3, 5, 7, 9, 11]
    assert [frame_index(f) for f in frames] == meta.frames_indices
    assert meta.timestamps == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 1.1])

    _, meta = load_video(clip_path, max_frames=3)
    assert meta.frames_indices == [2, 6, 10]
    _, meta = load_video(clip_path, fps=100)  # faster than the source: every frame
    assert meta.frames_indices == list(range(13))

    proc = ArlowVideoProcessor(min_pixels=28 * 28, max_pixels=SMALL, fps=5)
    out = proc(str(clip_path), return_metadata=True)
    assert out["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert out["second_per_grid_ts"].tolist() == pytest.approx([0.4])
    assert out["video_metadata"][0].frames_indices == [1, 3, 5, 7, 9, 11]
    assert proc(str(clip_path), num_frames=2)["video_grid_thw"].tolist() == [[1, 4, 4]]  # per call, fps dropped
    # arrays have no rate of their own: fps sampling needs it
    with pytest.raises(ValueError, match="frame rate"):
        proc(level_frames(4))
    assert proc(level_frames(4), video_metadata={"fps": 10})["video_grid_thw"].tolist() == [[1, 4, 4]]


def test_variable_frame_rate_video_is_sampled_by_presentation_time(tmp_path):
    """Frames 0-7 at 10 fps, then 8-12 at 2 fps (13 frames over 3.3 s): sampling at 2 fps gives what is on screen
    every half second, with its real presentation time."""
    starts_ms = [100 * k for k in range(8)] + [800 + 500 * k for k in range(5)]
    path = write_vfr_video(tmp_path / "vfr.mp4", level_frames(13), starts_ms)
    frames, meta = load_video(path, fps=2)
    moments = [i / meta.fps for i in meta.frames_indices]  # index i is the moment i / fps
    on_screen = [max(k for k, start in enumerate(starts_ms) if start <= 1000 * t + 1e-6) for t in moments]
    assert [frame_index(f) for f in frames] == on_screen
    assert meta.timestamps == pytest.approx([starts_ms[k] / 1000 for k in on_screen])
    assert len(set(on_screen)) == len(on_screen) > 3  # the slow half is not skipped over


@pytest.mark.parametrize("num_frames, grid_t", [(1, 1), (2, 1), (3, 2), (5, 3)])
def test_odd_and_single_frame_videos_pad_with_last_frame(num_frames, grid_t):
    frames = np.stack([random_rgb(56, 56, seed=i) for i in range(num_frames)])
    out = ArlowVideoProcessor(min_pixels=28 * 28, max_pixels=SMALL)(frames, return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[grid_t, 4, 4]]
    clip = unpatchify(out["pixel_values_videos"], out["video_grid_thw"][0], 14, 2, 2)
    assert clip.shape == (2 * grid_t, 3, 56, 56)
    for i in range(2 * grid_t):  # real frames in order, then copies of the last one
        source = frames[min(i, num_frames - 1)]
        np.testing.assert_allclose(clip[i].numpy(), normalised(source), atol=1e-6)


def test_video_processor_save_load(tmp_path, clip_path):
    proc = ArlowVideoProcessor(num_frames=4, max_frames=8, min_pixels=28 * 28, max_pixels=SMALL)
    proc.save_pretrained(tmp_path)
    again = ArlowVideoProcessor.from_pretrained(tmp_path)
    assert again == proc and again.num_frames == 4
    np.testing.assert_array_equal(again(str(clip_path))["pixel_values_videos"],
                                  proc(str(clip_path))["pixel_values_videos"])
    with pytest.raises(TypeError, match="unknown"):
        ArlowVideoProcessor(frame_rate=3)
    with pytest.raises(ValueError, match="not both"):
        ArlowVideoProcessor(num_frames=4, fps=2)


# ----------------------------------------------------------------------------------------------- tokenizer

def test_default_tokenizer_layout_and_round_trip():
    tok = load_default_tokenizer()
    assert isinstance(tok, ArlowTokenizerFast) and len(tok) == 8192 and tok.padding_side == "left"
    assert (default_tokenizer_dir() / "tokenizer.json").stat().st_size < 1_000_000
    config = ArlowConfig(text_config={"vocab_size": 8192, "hidden_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 4, "intermediate_size": 128},
                         vision_config={"depth": 1, "embed_dim": 32, "num_heads": 4, "hidden_size": 64})
    # the multimodal tokens are the last four ids, exactly where ArlowConfig's defaults put them
    assert [tok.image_token_id, tok.video_token_id, tok.vision_start_token_id, tok.vision_end_token_id] == [
        config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = "Return the 2nd item of the list, e.g. naïve café ☕ — done.\n\tx = f(3.14)"
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok("<|im_start|>user\n<|vision_start|><image><|vision_end|>hi<|im_end|>")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.image_token_id in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


# ----------------------------------------------------------------------------------------------- processor

def run_structure(ids: list[int], proc, token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id``; asserts each sits between vision_start and vision_end."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token_id:
            j = i
            while j < len(ids) and ids[j] == token_id:
                j += 1
            assert ids[i - 1] == proc.vision_start_token_id and ids[j] == proc.vision_end_token_id
            runs.append(j - i)
            i = j
        else:
            i += 1
    return runs


def test_expansion_counts_equal_encoder_tokens(processor, clip_path):
    images = [random_rgb(50, 75, seed=5), random_rgb(90, 40, seed=6), random_rgb(30, 30, seed=7)]
    texts = [
        "One image: <image> done.",
        "Two, one pre-wrapped: <|vision_start|><image><|vision_end|> and <image>.",
        "A video <video> then an image <image>",
        "Only text here.",
        "A lone video <|vision_start|><video><|vision_end|>",
    ]
    videos = [str(clip_path), level_frames(3, 30, 60)]
    out = processor(text=texts, images=images + [random_rgb(64, 64, seed=8)], videos=videos, padding=True,
                    return_tensors="pt", video_metadata=[{}, {"fps": 10}])
    merge = 4
    image_tokens = [int(g.prod()) // merge for g in out["image_grid_thw"]]
    video_tokens = [int(g.prod()) // merge for g in out["video_grid_thw"]]
    assert out["pixel_values"].shape[0] == 4 * sum(image_tokens)
    assert out["pixel_values_videos"].shape[0] == 4 * sum(video_tokens)
    ids = out["input_ids"].tolist()
    assert run_structure(ids[0], processor, processor.image_token_id) == image_tokens[:1]
    assert run_structure(ids[1], processor, processor.image_token_id) == image_tokens[1:3]
    assert run_structure(ids[2], processor, processor.video_token_id) == video_tokens[:1]
    assert run_structure(ids[2], processor, processor.image_token_id) == image_tokens[3:4]
    assert run_structure(ids[3], processor, processor.image_token_id) == []
    assert processor.vision_start_token_id not in ids[3]
    assert run_structure(ids[4], processor, processor.video_token_id) == video_tokens[1:2]
    assert out["second_per_grid_ts"].tolist() == pytest.approx([0.2, 0.2])
    typed = processor(text=texts[2], images=images[2:3], videos=videos[:1], return_mm_token_type_ids=True,
                      return_tensors="pt")
    kinds = typed["mm_token_type_ids"][0]
    assert torch.equal(kinds == 1, typed["input_ids"][0] == processor.image_token_id)
    assert torch.equal(kinds == 2, typed["input_ids"][0] == processor.video_token_id)
    mm = processor._get_num_multimodal_tokens(image_sizes=[(50, 75), (90, 40)], video_sizes=[(13, 48, 64)])
    assert mm.num_image_tokens == image_tokens[:2] and mm.num_video_tokens == video_tokens[:1]


def test_padding_is_on_the_left(processor):
    out = processor(text=["a much longer prompt with many words in it", "short"], padding=True,
                    return_tensors="pt")
    short_mask, short_ids = out["attention_mask"][1], out["input_ids"][1]
    n_pad = int((short_mask == 0).sum())
    assert n_pad > 0 and (short_mask[:n_pad] == 0).all() and (short_mask[n_pad:] == 1).all()
    assert (short_ids[:n_pad] == processor.tokenizer.pad_token_id).all()
    assert processor.decode(short_ids[n_pad:]) == "short"


def test_count_mismatch_and_truncation_errors(processor):
    image = random_rgb(56, 56)
    with pytest.raises(ValueError, match=r"found 2 image placeholder\(s\) <image> .* but 1 image\(s\)"):
        processor(text="<image> and <image>", images=[image])
    with pytest.raises(ValueError, match=r"found 0 video placeholder\(s\) .* but 1 video\(s\)"):
        processor(text="no placeholder", videos=[level_frames(2)])
    with pytest.raises(ValueError, match=r"per prompt \[2, 0\] do not match .* \[1, 1\]"):
        processor(text=["<image>", "<image>"], images=[[image, image], []])
    # 56x56 -> a run of 6 tokens (start, 4 x <image>, end); cutting at 4 tokens would split it
    with pytest.raises(ValueError, match="Truncation must not cut a run"):
        processor(text="<image> and a long tail of text after it", images=[image], truncation=True, max_length=4)
    # truncation that only drops text is fine
    out = processor(text="<image> and a long tail of text after it", images=[image], truncation=True, max_length=8)
    assert len(out["input_ids"][0]) == 8


def test_chat_template_exact_string_and_assistant_mask(processor):
    conversation = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "And this?"}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><image><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><video><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(conversation[:1]) == "<|im_start|>system\nYou are brief.<|im_end|>\n"
    with pytest.raises(Exception, match="audio content is not supported"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])


def test_apply_chat_template_loads_local_media_for_a_batch(processor, clip_path, tmp_path):
    image_path = tmp_path / "photo.png"
    Image.fromarray(random_rgb(60, 90, seed=9)).save(image_path)
    batch = [
        [{"role": "user", "content": [{"type": "image", "path": str(image_path)},
                                      {"type": "text", "text": "Describe."}]},
         {"role": "assistant", "content": "A photo."},
         {"role": "user", "content": [{"type": "video", "path": str(clip_path)}, {"type": "text", "text": "And?"}]}],
        [{"role": "user", "content": "Just text."}],
    ]
    out = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", padding=True, fps=5)
    # the same thing done by hand: render, then call the processor with the media
    prompts = processor.apply_chat_template(batch, add_generation_prompt=True)
    manual = processor(text=prompts, images=[load_image(image_path)], videos=[str(clip_path)], fps=5,
                       padding=True, return_tensors="pt")
    assert set(out.keys()) == set(manual.keys())
    for key in manual:
        assert torch.equal(out[key], manual[key]), key
    assert out["video_grid_thw"].tolist() == [[3, 4, 4]]  # fps=5 reached the video processor
    assert (out["attention_mask"][1] == 0).any() and out["attention_mask"][1, -1] == 1  # left padded

    masked = processor.apply_chat_template(batch, tokenize=True, return_dict=True, return_tensors="pt",
                                           padding=True, return_assistant_tokens_mask=True, fps=5)
    mask = masked["assistant_masks"][0].bool()
    assert processor.decode(masked["input_ids"][0][mask]) == "A photo.<|im_end|>"
    assert not masked["assistant_masks"][1].any()


def test_video_given_as_frames_in_a_chat(processor):
    frames = [Image.fromarray(f) for f in level_frames(3, 56, 56)]
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "?"}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert int((out["input_ids"] == processor.video_token_id).sum()) == 2 * 4 * 4 // 4


def test_decoding(processor):
    ids = processor(text=["<|im_start|>assistant\nHello there<|im_end|>", "Hi"], padding=True,
                    return_tensors="pt")["input_ids"]
    assert processor.post_process_image_text_to_text(ids) == ["assistant\nHello there", "Hi"]
    assert processor.post_process_image_text_to_text(ids[1]) == "Hi"
    assert processor.batch_decode(ids, skip_special_tokens=True)[1] == "Hi"
    assert set(processor.model_input_names) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}


# ----------------------------------------------------------------------------------------------- bad media

def test_bad_media_raise_clear_errors(tmp_path, clip_path, processor):
    with pytest.raises(MediaNotFoundError, match="does not exist") as info:
        load_image(tmp_path / "missing.png")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(str(tmp_path / "missing.mp4"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(text="<image>", images=[str(tmp_path / "missing.png")])

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(MediaDecodeError, match="not a readable image"):
        load_image(garbage)
    full = png_bytes(Image.fromarray(random_rgb(64, 64)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_image(truncated)

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00garbage" * 200)
    with pytest.raises(MediaDecodeError, match="not a readable video"):
        load_video(corrupt)
    data = clip_path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # index at the end: the cut file has no usable stream
    with pytest.raises(MediaDecodeError, match="truncated"):
        load_video(cut)
    faststart = write_video(tmp_path / "faststart.mp4", level_frames(12), options={"movflags": "faststart"})
    data = faststart.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # index first: frames run out early
    with pytest.raises(MediaDecodeError, match="truncated"):
        load_video(cut)
    empty = write_video(tmp_path / "empty.avi", np.zeros((0, 48, 64, 3), np.uint8))
    with pytest.raises(MediaDecodeError, match="no frames"):
        load_video(empty)
    with pytest.raises(ValueError, match="no frames"):
        processor(text="<video>", videos=[np.zeros((0, 56, 56, 3), np.uint8)])
    with pytest.raises(ValueError, match="aspect ratio"):
        processor(text="<image>", images=[np.zeros((2, 500, 3), np.uint8)])
    with pytest.raises(ValueError, match="image array must be"):
        load_image(np.zeros((5, 5, 7), np.uint8))


# ----------------------------------------------------------------------------------------------- save / load

def test_processor_round_trip_through_auto_processor(tmp_path, clip_path):
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # 5.17: top level needs torchvision

    proc = ArlowProcessor(
        ArlowImageProcessor(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 8),
        load_default_tokenizer(),
        video_processor={"num_frames": 4, "min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4},
        chat_template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    )
    # gotcha: a truncating call right before saving must not leak truncation into tokenizer.json
    proc(text="some words that get cut", truncation=True, max_length=3)
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "ArlowProcessor"
    assert saved["video_processor"]["num_frames"] == 4 and saved["image_processor"]["size"]["longest_edge"] == 28 * 28 * 8
    assert proc.get_attributes() == ["image_processor", "tokenizer", "video_processor"]  # transformers' attributes
    assert json.loads((tmp_path / "tokenizer.json").read_text())["truncation"] is None

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is ArlowProcessor and type(loaded.image_processor) is ArlowImageProcessor
    assert type(loaded.tokenizer) is ArlowTokenizerFast and loaded.tokenizer.padding_side == "left"
    assert loaded.chat_template == proc.chat_template and loaded.video_processor == proc.video_processor
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is ArlowImageProcessor
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is ArlowTokenizerFast

    text = ["<image> a prompt longer than three tokens <video>", "plain"]
    kwargs = dict(images=[random_rgb(70, 100)], videos=[str(clip_path)], padding=True, return_tensors="pt")
    before, after = proc(text=text, **kwargs), loaded(text=text, **kwargs)
    assert set(before.keys()) == set(after.keys())
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert after["video_grid_thw"].tolist() == [[2, 4, 4]]  # num_frames=4 and the pixel bounds survived
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_processor_folder_saved_with_video_config_still_loads(tmp_path):
    """Folders written before the video processor became a processor attribute hold its settings as
    ``video_config``; loading them keeps those settings."""
    from transformers import AutoProcessor

    ArlowProcessor(video_processor={"num_frames": 6, "max_frames": 12}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["video_config"] = config.pop("video_processor")
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    for load in (ArlowProcessor.from_pretrained, AutoProcessor.from_pretrained, ArlowVideoProcessor.from_pretrained):
        loaded = load(tmp_path)
        video = loaded if isinstance(loaded, ArlowVideoProcessor) else loaded.video_processor
        assert (video.num_frames, video.max_frames) == (6, 12), load


def test_processor_from_pretrained_takes_given_parts_and_video_overrides(tmp_path):
    ArlowProcessor(video_processor={"num_frames": 6}).save_pretrained(tmp_path)
    given = ArlowVideoProcessor(num_frames=3)
    loaded = ArlowProcessor.from_pretrained(tmp_path, video_processor=given)
    assert loaded.video_processor is given
    assert "video_processor" not in loaded.tokenizer.init_kwargs  # a part, not a tokenizer option
    loaded.save_pretrained(tmp_path / "again")  # nothing unserializable leaked into a config
    tuned = ArlowProcessor.from_pretrained(tmp_path, do_normalize=False, max_frames=9)
    assert (tuned.video_processor.num_frames, tuned.video_processor.max_frames) == (6, 9)
    assert tuned.video_processor.do_normalize is False and tuned.image_processor.do_normalize is False


def test_video_processor_from_dict_as_transformers_calls_it():
    saved = ArlowVideoProcessor(num_frames=5).to_dict()
    video, unused = ArlowVideoProcessor.from_dict(saved, max_frames=7, padding=True, return_unused_kwargs=True)
    assert (video.num_frames, video.max_frames, unused) == (5, 7, {"padding": True})
    assert ArlowVideoProcessor.from_dict(saved) == ArlowVideoProcessor(num_frames=5)
    video.size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 2}  # transformers' spelling of the bounds
    assert (video.min_pixels, video.max_pixels) == (28 * 28, 28 * 28 * 2)


def test_processor_takes_only_an_arlow_video_processor():
    with pytest.raises(TypeError, match="ArlowVideoProcessor"):
        ArlowProcessor(video_processor=ArlowImageProcessor())


def test_default_processor_needs_no_arguments():
    proc = ArlowProcessor()
    assert isinstance(proc.tokenizer, ArlowTokenizerFast) and proc.chat_template
    assert proc.image_token == "<image>" and proc.video_token_id == proc.tokenizer.video_token_id
    with pytest.raises(ValueError, match="disagree on merge_size"):
        ArlowProcessor(ArlowImageProcessor(merge_size=1), proc.tokenizer)


def test_offsets_in_prompt_map_expanded_tokens_back():
    from arlow._compat import offsets_in_prompt

    # prompt "ab<image>cd" -> expanded "ab" + "<s><image><image><e>" + "cd" (run of 20 chars replaces 7)
    prompt = "ab<image>cd"
    run = "<s>" + "<image>" * 2 + "<e>"
    expanded = "ab" + run + "cd"
    spans = [{"span": (2, 9), "new_span": (2, 2 + len(run))}]
    tokens = [(0, 0), (0, 2), (2, 5), (5, 12), (12, 19), (19, 22), (22, 23), (23, 24)]  # pad, ab, run x4, c, d
    assert expanded[22:24] == "cd"
    got = offsets_in_prompt([tokens], [spans])[0]
    assert got == [(0, 0), (0, 2), (2, 9), (2, 9), (2, 9), (2, 9), (9, 10), (10, 11)]
    assert [prompt[s:e] for s, e in got[-2:]] == ["c", "d"]
