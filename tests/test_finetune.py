"""Stages 2 and 3 (arlow.finetune): loss masks, truncation, sources, batching, freezing, LoRA, the stage runner.

Every check compares against an independent computation: label positions found by scanning the token ids, a
dummy-row batch against the same batch without it, resumed data against uninterrupted data, a reloaded adapter and
a merged model against the adapted model, weights before and after real optimizer steps of the training engine.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from media import write_video
from PIL import Image

import arlow  # noqa: F401  (registers the Auto classes)
from arlow.assemble import build_preset
from arlow.finetune.collate import DummyVision, collate_examples
from arlow.finetune.data import FinetuneData, pack_by_length
from arlow.finetune.examples import IGNORE_INDEX, ExampleEncoder, RejectedExample, truncate
from arlow.finetune.freezing import (
    apply_freezing,
    format_report,
    group_of,
    optimizer_groups,
    parameter_groups,
    trainable_report,
)
from arlow.finetune.lora import (
    LoraSettings,
    apply_lora,
    check_quantization,
    load_adapter,
    merge_adapter,
    quantized_load_device,
    save_adapter,
)
from arlow.finetune.sources import HFDataset, JsonLines, TarSamples, record_source
from arlow.finetune.stage import build_model, finetune, load_recipe

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset VLM (random weights) and its processor (<= 16 tokens per image)."""
    model, processor = build_preset("tiny")
    return model, processor


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two PNG images (56x56 -> 4 tokens; 56x112 -> 8 tokens) and one 4-frame clip, on disk."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (112, 56, 3), dtype=np.uint8)).save(root / "b.png")
    write_video(root / "c.mp4", rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), fps=2)
    return root


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _targets(ex) -> list[int]:
    return ex.input_ids[ex.labels != IGNORE_INDEX].tolist()


def _chat(image_path: str, answer: str = "red", question: str = "Colour?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "path": image_path},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


# ----------------------------------------------------------------------------------------------------------------
# loss masks


def test_caption_labels_are_exactly_the_caption_and_eos(tiny, media):
    _, processor = tiny
    encoder = ExampleEncoder(processor, "caption")
    ex = encoder({"image": str(media / "a.png"), "caption": "a red circle."})
    caption = _ids(processor, "a red circle.")
    p = processor
    run = [p.vision_start_token_id] + [p.image_token_id] * 4 + [p.vision_end_token_id]  # 56x56 -> 2x2 windows
    eos = processor.tokenizer.eos_token_id
    assert ex.input_ids.tolist() == run + caption + [eos]
    assert ex.labels.tolist() == [IGNORE_INDEX] * len(run) + caption + [eos]
    assert ex.media["image_grid_thw"].tolist() == [[1, 4, 4]]
    # a prompt between media and caption is an input, never a target
    prompted = ExampleEncoder(processor, "caption", caption_prompt="Describe:")({"image": str(media / "a.png"),
                                                                                "caption": "a red circle."})
    prompt = _ids(processor, "Describe:")
    assert prompted.input_ids.tolist() == run + prompt + caption + [eos]
    assert _targets(prompted) == caption + [eos]


def test_chat_labels_are_exactly_the_assistant_turns(tiny, media):
    _, processor = tiny
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "path": str(media / "a.png")},
                                     {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And how many?"},
        {"role": "assistant", "content": [{"type": "text", "text": "two of them"}]},
    ]}
    ex = ExampleEncoder(processor, "chat")(record)
    ids = ex.input_ids.tolist()
    # independent: the tokens after each "<|im_start|>assistant\n" header up to and including its <|im_end|>
    tok = processor.tokenizer
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = [start] + _ids(processor, "assistant\n")
    expected = set()
    for i in range(len(ids) - len(header)):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != end:
                expected.add(j)
                j += 1
            expected.add(j)
    labelled = {i for i, label in enumerate(ex.labels.tolist()) if label != IGNORE_INDEX}
    assert labelled == expected
    assert len(expected) == len(_ids(processor, "red")) + len(_ids(processor, "two of them")) + 2
    assert tok.decode(_targets(ex)) == "red<|im_end|>two of them<|im_end|>"
    assert all(ex.labels[i] == ids[i] for i in labelled)
    # the system prompt, the user turns and the 4 image tokens are never targets
    assert not any(ids[i] == processor.image_token_id for i in labelled)


def test_several_media_text_only_and_llava_format(tiny, media):
    _, processor = tiny
    encoder = ExampleEncoder(processor, "chat", media_kwargs={"fps": 2})
    multi = encoder({"messages": [
        {"role": "user", "content": [{"type": "image", "path": str(media / "a.png")},
                                     {"type": "image", "path": str(media / "b.png")},
                                     {"type": "video", "path": str(media / "c.mp4")},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "same"}]})
    assert multi.media["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 4]]
    assert multi.media["video_grid_thw"].shape == (1, 3)
    n_video = int(multi.media["video_grid_thw"].prod()) // 4
    assert int((multi.input_ids == processor.image_token_id).sum()) == 4 + 8
    assert int((multi.input_ids == processor.video_token_id).sum()) == n_video
    text_only = encoder({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]})
    assert text_only.media == {} and processor.tokenizer.decode(_targets(text_only)) == "hello<|im_end|>"
    native = encoder(_chat(str(media / "a.png"), "red", "What colour?"))
    llava = encoder({"image": str(media / "a.png"), "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]})
    assert llava.input_ids.tolist() == native.input_ids.tolist()
    assert llava.labels.tolist() == native.labels.tolist()
    with pytest.raises(RejectedExample, match="no assistant turn"):
        encoder({"messages": [{"role": "user", "content": "Hi"}]})


# ----------------------------------------------------------------------------------------------------------------
# truncation


def test_truncation_never_splits_a_placeholder_run(tiny, media):
    _, processor = tiny
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look at this picture please:"},
                                     {"type": "image", "path": str(media / "b.png")},
                                     {"type": "text", "text": "What is in it, in a few words?"}]},
        {"role": "assistant", "content": "a field of random coloured noise"}]}
    full = ExampleEncoder(processor, "chat", max_length=None)(record)
    protected = [processor.image_token_id, processor.video_token_id, processor.vision_start_token_id,
                 processor.vision_end_token_id]
    last_vision = max(i for i, t in enumerate(full.input_ids.tolist()) if t in protected)
    first_target = int((full.labels != IGNORE_INDEX).nonzero()[0])
    outcomes = set()
    for max_length in range(8, len(full) + 2):
        try:
            cut = truncate(full, max_length, protected)
        except RejectedExample as err:
            outcomes.add(err.kind)
            # rejected exactly when the cut reaches a vision token, or leaves no target
            assert (max_length <= last_vision and err.kind == "overflow") or \
                   (max_length > last_vision and max_length <= first_target + 1 and err.kind == "no_target")
            continue
        outcomes.add("kept")
        assert len(cut) == min(max_length, len(full))
        assert cut.input_ids.tolist() == full.input_ids[:len(cut)].tolist()
        assert int((cut.input_ids == processor.image_token_id).sum()) == 8  # the whole run, always
        assert cut.media is full.media
    assert outcomes == {"overflow", "no_target", "kept"}


def test_pipeline_drops_overlong_examples_with_a_counted_warning(tiny, media, caplog):
    _, processor = tiny
    long_text = " ".join(["word"] * 60)
    records = [_chat(str(media / "a.png")),
               {"messages": [{"role": "user", "content": [{"type": "text", "text": long_text},
                                                          {"type": "image", "path": str(media / "a.png")}]},
                             {"role": "assistant", "content": "x"}]},
               _chat(str(media / "b.png"), "blue")]
    encoder = ExampleEncoder(processor, "chat", max_length=40)
    data = FinetuneData(records, encoder, shuffle=False, epochs=1)
    with caplog.at_level(logging.WARNING, logger="arlow.finetune.data"):
        batches = list(data)
    assert sum(b["num_samples"] for b in batches) == 2
    assert data.num_dropped == 1 and data.dropped_by_kind == {"overflow": 1}
    assert any("records[1]" in r.message and "placeholder run" in r.message for r in caplog.records)
    strict = FinetuneData(records, encoder, shuffle=False, epochs=1, overflow="error")
    with pytest.raises(ValueError, match="records\\[1\\].*overflow='error'"):
        list(strict)


# ----------------------------------------------------------------------------------------------------------------
# sources


def test_sources_jsonl_datasets_and_webdataset_give_the_same_examples(tiny, media, tmp_path):
    import datasets
    import webdataset as wds

    _, processor = tiny
    png = (media / "a.png").read_bytes()
    # JSON lines with paths relative to the file
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png)
    rows = [{"image": "img/a.png", "caption": "noise."},
            {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/a.png"},
                                                       {"type": "text", "text": "Q?"}]},
                          {"role": "assistant", "content": "A"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    jsonl = record_source(str(tmp_path / "d.jsonl"))
    assert isinstance(jsonl, JsonLines) and len(jsonl) == 2
    assert jsonl.record(0)["image"] == str(tmp_path / "img" / "a.png")
    # a saved `datasets` dataset with an Image column
    ds = datasets.Dataset.from_dict({"image": [Image.open(media / "a.png")], "caption": ["noise."]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    hf = record_source(str(tmp_path / "hf"))
    assert isinstance(hf, HFDataset)
    # webdataset shards: a caption sample (png + txt) and a conversation whose image block names no source
    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as sink:
        sink.write({"__key__": "s0", "png": png, "txt": "noise."})
        sink.write({"__key__": "s1", "png": png, "json": json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": "A"}]}).encode()})
    tar = record_source(str(tmp_path / "shard-{000..000}.tar"))
    assert isinstance(tar, TarSamples) and len(tar) == 2

    captions, chat = ExampleEncoder(processor, "caption"), ExampleEncoder(processor, "chat")
    reference = captions(jsonl.record(0))
    for ex in (captions(hf.record(0)), captions(tar.record(0))):
        assert ex.input_ids.tolist() == reference.input_ids.tolist()
        assert ex.labels.tolist() == reference.labels.tolist()
        assert torch.equal(ex.media["pixel_values"], reference.media["pixel_values"])
    a, b = chat(jsonl.record(1)), chat(tar.record(1))
    assert a.input_ids.tolist() == b.input_ids.tolist()
    assert torch.equal(a.media["pixel_values"], b.media["pixel_values"])
    with pytest.raises(ValueError, match="does not exist"):
        record_source(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------------------------
# batching


def test_pack_by_length_respects_the_budget_and_covers_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, 300).tolist() + [900]
    groups = pack_by_length(lengths, tokens_per_batch=1000, max_batch_size=16)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= 16
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 1000
    # grouping by length keeps padding small: under 25% of the padded tokens here
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert 1 - sum(lengths) / padded < 0.25


def test_dummy_vision_row_leaves_loss_and_gradients_unchanged(tiny, media):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    encoder = ExampleEncoder(processor, "chat")
    examples = [encoder({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                for q, a in (("Hi", "hello there"), ("Name a colour.", "red"))]
    pad = processor.tokenizer.pad_token_id
    plain = collate_examples(examples, pad)
    dummy = collate_examples(examples, pad, DummyVision.from_processor(processor))
    assert "pixel_values" not in plain and dummy["input_ids"].shape[0] == 3
    assert dummy["num_samples"] == plain["num_samples"] == 2 and dummy["num_tokens"] == plain["num_tokens"]
    assert (dummy["labels"][2] == IGNORE_INDEX).all()

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        inputs = {k: v for k, v in batch.items() if k not in ("num_tokens", "num_samples")}
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(dummy)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name, grad in grads_a.items():
        if grad is None:  # unused without images: the vision tower and mergers
            assert name.startswith("model.visual."), name
            assert grads_b[name] is not None and grads_b[name].abs().max() == 0, name  # used, but weighted zero
        else:
            torch.testing.assert_close(grad, grads_b[name], rtol=1e-5, atol=1e-7)
    # with media in the batch no dummy row is added
    with_image = collate_examples([encoder(_chat(str(media / "a.png")))], pad, DummyVision.from_processor(processor))
    assert with_image["input_ids"].shape[0] == 1 and with_image["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_sharding_and_exact_data_resume(tiny, media):
    _, processor = tiny
    records = [_chat(str(media / ("a.png" if i % 2 else "b.png")), answer="x" * (1 + i % 7)) for i in range(23)]
    encoder = ExampleEncoder(processor, "chat")
    settings = dict(tokens_per_batch=160, max_batch_size=4, group_size=8, seed=3)
    shards = [FinetuneData(records, encoder, rank=r, world_size=2, **settings).shard(0) for r in range(2)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(23)) and not set(shards[0]) & set(shards[1])

    data = FinetuneData(records, encoder, rank=1, world_size=2, **settings)
    stream = iter(data)
    reference = [next(stream) for _ in range(12)]  # crosses windows and an epoch boundary
    fresh = FinetuneData(records, encoder, rank=1, world_size=2, **settings)
    stream = iter(fresh)
    for _ in range(5):
        next(stream)
    state = copy.deepcopy(fresh.state_dict())
    resumed = FinetuneData(records, encoder, rank=1, world_size=2, **settings)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[5:], resumed):
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(torch.as_tensor(expected[key]), torch.as_tensor(got[key])), key
    other = FinetuneData(records, encoder, rank=1, world_size=2, **{**settings, "group_size": 4})
    with pytest.raises(ValueError, match="group_size"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# freezing


def test_every_parameter_is_in_exactly_one_named_group(tiny):
    model, _ = tiny
    groups = parameter_groups(model)
    names = [n for params in groups.values() for n, _ in params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert group_of("model.visual.deepstack_mergers.0.mlp.0.weight") == "deepstack_mergers"
    assert group_of("model.visual.merger.ln_q.weight") == "merger"
    assert group_of("model.visual.blocks.1.attn.qkv.weight") == "vision_encoder"
    assert group_of("model.language_model.visual_gates") == "gates"
    assert group_of("lm_head.weight") == "embeddings"
    assert group_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora"
    assert group_of("base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "language_model"
    with pytest.raises(ValueError, match="unknown parameter group"):
        apply_freezing(copy.deepcopy(model), ["merger", "vision"])
    # B.21: the vision encoder and the DeepStack mergers are frozen or trained independently
    m = copy.deepcopy(model)
    apply_freezing(m, ["deepstack_mergers"])
    assert all(p.requires_grad == n.startswith("model.visual.deepstack_mergers.") for n, p in m.named_parameters())


def test_freezing_really_freezes_and_unfreezing_trains(tiny, tmp_path, media):
    from arlow.modeling.multimodal import ArlowForConditionalGeneration
    from arlow.training import TrainConfig, Trainer

    preset, processor = tiny
    config = copy.deepcopy(preset.config)
    # the preset adds DeepStack level 1 after the last text layer, where it reaches no loss (its gradient is 0):
    # route both levels to layer 0 so that every trainable parameter must move
    config.deepstack_text_layers = [0, 0]
    torch.manual_seed(1)
    model = ArlowForConditionalGeneration(config)
    counts = apply_freezing(model, ["merger", "deepstack_mergers", "gates"])
    assert counts["vision_encoder"] == counts["language_model"] == counts["embeddings"] == 0 and counts["merger"] > 0
    report = trainable_report(model, {"merger": 5e-3}, 1e-3)
    assert {r["group"]: r["lr"] for r in report}["merger"] == 5e-3
    assert "frozen" in format_report(report)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = [_chat(str(media / "a.png"), "red"), _chat(str(media / "b.png"), "blue")]
    data = FinetuneData(records, ExampleEncoder(processor, "chat"), shuffle=False)
    groups = optimizer_groups(model, {"merger": 5e-3})
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=1e-3, save_every=0,
                      progress_bar=False, tensorboard=False, weight_decay=0.1)
    trainer = Trainer(cfg, model, data, param_groups=groups)
    lrs = {g["name"]: g["initial_lr"] for g in trainer._torch_optimizer.param_groups}
    assert lrs["merger.decay"] == 5e-3 and lrs["deepstack_mergers.decay"] == 1e-3
    trainer.train()
    state = trainer._torch_optimizer.state
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"
            assert p in state
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
            assert p.grad is None and p not in state
    # unfreezing: the vision encoder now trains too
    apply_freezing(model, ["vision_encoder", "merger"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(output_dir=str(tmp_path / "run2"), max_steps=1, learning_rate=1e-3, save_every=0,
                      progress_bar=False, tensorboard=False)
    Trainer(cfg, model, FinetuneData(records, ExampleEncoder(processor, "chat")),
            param_groups=optimizer_groups(model)).train()
    changed = {group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"vision_encoder", "merger"}


# ----------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_round_trip_and_merge(tiny, media, tmp_path):
    model, processor = tiny
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    peft_model = apply_lora(copy.deepcopy(model), LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
    apply_freezing(peft_model, ["lora", "merger"])
    assert {group_of(n) for n, p in peft_model.named_parameters() if p.requires_grad} == {"lora", "merger"}
    with torch.no_grad():  # stand-in for training: non-zero adapters and a changed merger
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    inputs = processor.apply_chat_template(_chat(str(media / "a.png"))["messages"], tokenize=True, return_dict=True,
                                           return_tensors="pt")
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        original = base.eval()(**inputs).logits
    assert (adapted - original).abs().max() > 1e-3  # the adapters do something
    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "trainable_extras.safetensors").is_file()
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=0, atol=0)
    merged = merge_adapter(reloaded).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-5, atol=1e-5)


def test_qlora_is_refused_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="needs bitsandbytes and a CUDA GPU"):
        check_quantization("4bit")
    with pytest.raises(ValueError, match="CUDA GPU"):
        build_model({"path": "nowhere"}, LoraSettings(enabled=True, quantization="4bit"))
    with pytest.raises(ValueError, match="needs lora.enabled"):
        LoraSettings(quantization="4bit")


def test_quantized_load_device_follows_the_local_rank():
    # 2 nodes x 4 processes on 8-GPU nodes: node 1's processes are ranks 4..7 with local ranks 0..3.
    for rank in range(8):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank % 4), "WORLD_SIZE": "8"}
        assert quantized_load_device(env, 8) == rank % 4  # RANK % 8 would give 4..7 on node 1
    assert quantized_load_device({"RANK": "5", "LOCAL_RANK": "5", "WORLD_SIZE": "8"}, 1) == 0  # one GPU visible
    assert quantized_load_device({"RANK": "3", "WORLD_SIZE": "4"}, 4) == 3  # one node, no LOCAL_RANK
    assert quantized_load_device({}, 2) == 0  # plain python
    with pytest.raises(ValueError, match="export LOCAL_RANK"):
        quantized_load_device({"RANK": "9", "WORLD_SIZE": "16"}, 8)
    with pytest.raises(ValueError, match="LOCAL_RANK=4 but this process sees 2 GPUs"):
        quantized_load_device({"LOCAL_RANK": "4"}, 2)
    with pytest.raises(ValueError, match="sees none"):
        quantized_load_device({"LOCAL_RANK": "0"}, 0)


# ----------------------------------------------------------------------------------------------------------------
# the stage runner (arlow align / arlow sft)


def _write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_recipes_load_and_refuse_unknown_keys():
    for stage, name in (("align", "align_tiny"), ("sft", "sft_tiny"), ("sft", "sft_lora"), ("sft", "sft_qlora"),
                        ("align", "align"), ("sft", "sft"), ("align", "shapes_align"), ("sft", "shapes_sft")):
        tree = load_recipe(stage, name)
        assert tree["train"]
    with pytest.raises(ValueError, match="unknown data key"):
        load_recipe("align", None, ["data.max_len=4"])
    with pytest.raises(ValueError, match="belongs to `arlow sft`"):
        load_recipe("align", None, ["lora.enabled=true"])


def test_sft_with_lora_writes_loadable_checkpoints_and_resumes_exactly(media, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    records = [_chat(str(media / "a.png"), "red"), _chat(str(media / "b.png"), "blue"),
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]}]
    data_file = _write_records(tmp_path / "chat.jsonl", records)

    def tree(out, steps, resume=None, save_every=2):
        overrides = ["model.preset=tiny", "model.path=null", f"data.train={data_file}", f"train.output_dir={out}",
                     f"train.max_steps={steps}", f"train.save_every={save_every}", "train.keep_last=0",
                     "train.progress_bar=false", "train.tensorboard=false", "data.tokens_per_batch=120",
                     "data.max_batch_size=2", "lora.enabled=true", "lora.r=4", "lora.dropout=0.0",
                     "train.warmup_steps=0", "train.min_lr_ratio=1.0", "trainable.groups=[merger,lora]"]
        if resume:
            overrides.append(f"train.resume={resume}")
        return load_recipe("sft", "sft_tiny", overrides)

    summary = finetune(tree(tmp_path / "a", 4), "sft")
    ckpt = Path(summary["last_checkpoint"])
    assert (ckpt / "adapter" / "adapter_config.json").is_file() and (ckpt / "model" / "config.json").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(ckpt / "model").eval()
    processor = AutoProcessor.from_pretrained(ckpt / "model")
    # the exported merged model equals the engine's adapted weights (checkpoint-4/model.safetensors)
    engine_state = load_file(str(ckpt / "model.safetensors"))
    base, _ = build_preset("tiny")
    peft_model = apply_lora(base, LoraSettings(enabled=True, r=4, dropout=0.0))
    peft_model.load_state_dict(engine_state, strict=False)
    inputs = processor.apply_chat_template(records[0]["messages"], tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, peft_model.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)

    # a run stopped at step 2 and resumed ends with the same weights as the uninterrupted one (constant lr,
    # min_lr_ratio=1, so that the shorter first run's schedule is the same as the long run's)
    finetune(tree(tmp_path / "b", 2), "sft")
    finetune(tree(tmp_path / "b", 4, resume="latest"), "sft")
    resumed_state = load_file(str(tmp_path / "b" / "checkpoint-4" / "model.safetensors"))
    assert resumed_state.keys() == engine_state.keys()
    for key in engine_state:
        assert torch.equal(resumed_state[key], engine_state[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("dummy_vision", [True, False])
def test_two_processes_with_an_imageless_rank_do_not_hang(media, tmp_path, dummy_vision):
    """DDP on 2 CPU processes: rank 0 sees only image conversations, rank 1 only text (records alternate and
    shuffle is off). With the dummy vision row the run completes; without it DDP's reducer on rank 1 waits for
    vision gradients that never come (the control: the ranks' collectives fall out of step and the run fails)."""
    records = []
    for i in range(8):
        records.append(_chat(str(media / "a.png"), "red"))
        records.append({"messages": [{"role": "user", "content": f"Say {i}."},
                                     {"role": "assistant", "content": f"{i}"}]})
    data_file = _write_records(tmp_path / "chat.jsonl", records)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "arlow.cli", "sft", "--config", "sft_tiny", "model.preset=tiny", "model.path=null",
           f"data.train={data_file}", "data.shuffle=false", f"data.dummy_vision={str(dummy_vision).lower()}",
           f"train.output_dir={out}", "train.max_steps=3", "train.progress_bar=false", "train.tensorboard=false",
           "data.max_batch_size=2", "train.warmup_steps=0",
           "trainable.groups=[merger,deepstack_mergers,gates,language_model]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if not dummy_vision:
        # the ranks' collectives fall out of step: DDP's reducer complains, or gloo aborts on the mismatched call
        # that follows (the engine's per-micro-batch data-error all-reduce) - either way the run cannot finish
        text = proc.stderr + proc.stdout
        assert proc.returncode != 0
        assert "Expected to have finished reduction" in text or "gloo::EnforceNotMet" in text, text[-3000:]
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "checkpoint-3" / "model" / "config.json").is_file()
    states = [torch.load(out / "checkpoint-3" / f"data_state_{r}.pt", weights_only=False) for r in range(2)]
    assert [s["fingerprint"]["rank"] for s in states] == [0, 1]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and log[-1]["nonfinite_skipped"] == 0
