"""ArlowModel / ArlowForConditionalGeneration: processor -> model, batching, caching, M-RoPE, DeepStack, gates,
errors, save/load and assembly. Tiny configs on CPU; media generated here (sizes chosen so that the grids are known).
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from media import random_rgb, write_video
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

import arlow  # noqa: F401  (registers the Auto classes)
from arlow.assemble import assemble, create_model
from arlow.configuration import ArlowTextConfig
from arlow.modeling.multimodal import ArlowForConditionalGeneration, ArlowModel, run_lengths
from arlow.modeling.text import ArlowForCausalLM
from arlow.processing import ArlowImageProcessor, ArlowProcessor, ArlowVideoProcessor, load_default_tokenizer

VOCAB = 8192  # the built-in tokenizer; its last four ids are <image>, <video>, <|vision_start|>, <|vision_end|>
IMAGE, VIDEO, VSTART, VEND = 8188, 8189, 8190, 8191


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    """``tiny_model(seed, text=None, **top)``: a seeded VLM of the tiny "vlm" config (conftest's ``tiny_config``;
    ``text`` overrides the text sub-config, ``top`` the top-level fields)."""

    def make(seed=0, text=None, **top) -> ArlowForConditionalGeneration:
        torch.manual_seed(seed)
        return ArlowForConditionalGeneration(tiny_config("vlm", text=text, **top)).eval()

    return make


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model()


@pytest.fixture(scope="module")
def processor():
    # Small pixel bounds: a 56x84 image stays 56x84 -> grid (1, 4, 6) -> 6 tokens; video frames 56x56 -> 4 tokens
    # per temporal patch.
    image = ArlowImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 12)
    video = ArlowVideoProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 4, num_frames=4)
    return ArlowProcessor(image, load_default_tokenizer(), video_processor=video)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    paths = {}
    for name, (h, w, seed) in {"wide": (56, 84, 1), "square": (56, 56, 2), "tall": (84, 56, 3)}.items():
        paths[name] = str(root / f"{name}.png")
        Image.fromarray(random_rgb(h, w, seed)).save(paths[name])
    frames = np.stack([random_rgb(56, 56, 10 + i) for i in range(4)])
    paths["clip"] = str(write_video(root / "clip.mp4", frames, fps=4))
    return paths


def conversation(*blocks):
    content = []
    for block in blocks:
        if block.startswith("text:"):
            content.append({"type": "text", "text": block[5:]})
        else:
            kind, path = block.split("=", 1)
            content.append({"type": kind, "path": path})
    return [{"role": "user", "content": content}]


def encode(processor, conversations, **kwargs):
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True, **kwargs)


def mixed_conversations(media):
    return [
        conversation(f"image={media['wide']}", "text:What is this?"),
        conversation(f"image={media['square']}", f"image={media['tall']}", "text:Compare them."),
        conversation(f"video={media['clip']}", "text:What happens?"),
        conversation(f"video={media['clip']}", "text:and", f"image={media['wide']}", "text:Same?"),
        [{"role": "user", "content": "A text-only question that is the longest prompt of this batch, by far."}],
    ]


def capture_embeds(model):
    """Record the inputs_embeds that reach the decoder."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------------------------------------------
# Placeholder replacement


def test_run_lengths():
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert run_lengths(mask) == [2, 1, 1, 1]  # the run at the end of row 0 does not merge with row 1's first


def test_each_placeholder_run_gets_its_items_tokens(model, processor, media):
    inputs = encode(processor, [conversation(f"image={media['square']}", "text:then", f"image={media['wide']}",
                                             "text:and", f"video={media['clip']}")])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    seen, handle = capture_embeds(model)
    with torch.no_grad():
        model(**inputs)
        images = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        videos = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    handle.remove()
    assert [len(x) for x in images.pooler_output] == [4, 6]  # t*h*w/4 per image, not one pooled vector
    assert [len(x) for x in videos.pooler_output] == [8]
    ids, embeds = inputs["input_ids"][0], seen["embeds"][0]
    image_pos = (ids == IMAGE).nonzero().flatten()
    torch.testing.assert_close(embeds[image_pos[:4]], images.pooler_output[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[image_pos[4:]], images.pooler_output[1], rtol=0, atol=0)
    torch.testing.assert_close(embeds[ids == VIDEO], videos.pooler_output[0], rtol=0, atol=0)
    text = (ids != IMAGE) & (ids != VIDEO)
    torch.testing.assert_close(embeds[text], model.get_input_embeddings()(ids[text]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Batches equal single conversations; caching equals full forwards


def _real_logits(model, inputs, row):
    with torch.no_grad():
        logits = model(**inputs).logits[row]
    return logits[inputs["attention_mask"][row].bool()]


def test_mixed_batch_equals_each_conversation_alone(model, processor, media):
    conversations = mixed_conversations(media)
    batch = encode(processor, conversations)
    assert (batch["attention_mask"][:, 0] == 0).sum() == 4  # left padded; only the text-only row is full
    with torch.no_grad():
        batch_logits = model(**batch).logits
        batch_out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row, conv in enumerate(conversations):
        single = encode(processor, [conv])
        real = batch["attention_mask"][row].bool()
        with torch.no_grad():
            alone = model(**single).logits[0]
            alone_out = model.generate(**single, max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(batch_logits[row][real], alone, rtol=1e-4, atol=1e-4)
        assert batch_out[row, width:].tolist() == alone_out[0, single["input_ids"].shape[1]:].tolist(), row


def test_beam_search_repeats_each_samples_media(model, processor, media):
    conversations = [conversation(f"image={media['square']}", "text:a"),
                     conversation(f"image={media['wide']}", f"video={media['clip']}", "text:b")]
    batch = encode(processor, conversations)
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad():
        out = model.generate(**batch, **kwargs)
        for row, conv in enumerate(conversations):
            single = encode(processor, [conv])
            alone = model.generate(**single, **kwargs)
            assert out[row, batch["input_ids"].shape[1]:].tolist() == alone[0, single["input_ids"].shape[1]:].tolist()


def test_beam_search_from_inputs_embeds_matches_input_ids(model, processor, media):
    """Beam search and several sequences per prompt from ``inputs_embeds`` + pixels (placeholders found by their
    embedding, each sample's media repeated with it) give the ids and beam scores of the same search from
    ``input_ids``. The two samples differ in media so that a wrong repetition changes the result."""
    batch = encode(processor, [conversation(f"image={media['square']}", "text:a"),
                               conversation(f"image={media['wide']}", f"video={media['clip']}", "text:b")])
    prompt = batch["input_ids"].shape[1]
    media_inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    kwargs = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        from_ids = model.generate(input_ids=batch["input_ids"], **media_inputs, **kwargs)
        from_embeds = model.generate(inputs_embeds=embeds, **media_inputs, **kwargs)
    assert from_ids.sequences.shape == (4, prompt + 4)
    assert from_embeds.sequences.tolist() == from_ids.sequences[:, prompt:].tolist()  # embeds: new tokens only
    torch.testing.assert_close(from_embeds.sequences_scores, from_ids.sequences_scores, rtol=1e-5, atol=1e-5)
    # the media reached the prompt: without them the same search from the same ids scores differently
    with torch.no_grad():
        blind = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    assert not torch.allclose(blind.sequences_scores, from_ids.sequences_scores)


def test_cached_decode_equals_full_forward(model, processor, media):
    conversations = [conversation(f"image={media['wide']}", "text:Describe."),
                     conversation(f"video={media['clip']}", f"image={media['tall']}", "text:Describe both.")]
    inputs = encode(processor, conversations)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full_ids = out.sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(full_ids[:, prompt:])], dim=1)
        media_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        full = model(input_ids=full_ids, attention_mask=mask, use_cache=False, **media_inputs).logits
    step_logits = torch.stack(out.logits, dim=1)  # (B, 6, V): the logits each decode step saw
    torch.testing.assert_close(step_logits, full[:, prompt - 1:-1], rtol=1e-4, atol=1e-4)
    assert torch.equal(full[:, prompt - 1:-1].argmax(-1), full_ids[:, prompt:])


def test_manual_cached_steps_use_rope_deltas(model, processor, media):
    """Without generate(): a prefill caches rope_deltas and later forwards place new tokens after the media."""
    inputs = encode(processor, [conversation(f"image={media['wide']}", "text:x"),
                                conversation("text:only text here, a longer prompt than the other one")])
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        nxt = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        step = model(input_ids=nxt, attention_mask=mask, past_key_values=prefill.past_key_values,
                     image_grid_thw=inputs["image_grid_thw"])
        full = model(input_ids=torch.cat([inputs["input_ids"], nxt], 1), attention_mask=mask,
                     pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)
    assert torch.equal(prefill.rope_deltas, step.rope_deltas)


def test_logits_to_keep(model, processor, media):
    inputs = encode(processor, [conversation(f"image={media['square']}", "text:hi")])
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
    assert last.shape == (1, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)  # one row vs all: other matmul shapes


# ----------------------------------------------------------------------------------------------------------------
# M-RoPE positions


def test_rope_index_image_then_text_by_hand(model):
    # text text <vs> [image 1x4x6 patches -> 2x3 merged] <ve> text text
    ids = torch.tensor([[5, 6, VSTART] + [IMAGE] * 6 + [VEND, 7, 8]])
    pos, delta = model.model.get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    t = [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    h = [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    w = [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert pos[:, 0].tolist() == [t, h, w]
    assert delta.tolist() == [[9 - 12]]  # the next token (index 12) sits at position 9
    # Left padding: padded slots are skipped, real tokens keep their positions, the delta shrinks by the padding.
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0] + [1] * 12])
    pos, delta = model.model.get_rope_index(padded, image_grid_thw=torch.tensor([[1, 4, 6]]), attention_mask=mask)
    assert pos[:, 0, 2:].tolist() == [t, h, w] and delta.tolist() == [[9 - 14]]


def test_rope_index_video_follows_seconds_per_patch(tiny_model, model):
    # <vs> [video 2x2x2 patches -> 2 temporal x 1 x 1 merged] <ve> text; 1.5 s per temporal patch, 2 tokens/s.
    ids = torch.tensor([[4, VSTART, VIDEO, VIDEO, VEND, 9]])
    grid = torch.tensor([[2, 2, 2]])
    pos, delta = model.model.get_rope_index(ids, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.5]))
    # temporal index 1 -> 1 * 1.5 s * 2 tokens/s = 3
    assert pos[:, 0].tolist() == [[0, 1, 2, 5, 6, 7], [0, 1, 2, 2, 6, 7], [0, 1, 2, 2, 6, 7]]
    assert delta.tolist() == [[8 - 6]]
    plain = tiny_model(tokens_per_second=None)
    pos, _ = plain.model.get_rope_index(ids, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.5]))
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5]  # without tokens_per_second: one position per temporal patch


def test_rope_index_text_only_shortcut_matches_the_general_routine(model):
    from arlow.modeling.rope import get_rope_index

    ids = torch.randint(0, 8000, (3, 7))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]])
    for m in (mask, None):
        fast = model.model.get_rope_index(ids, attention_mask=m)
        general = get_rope_index(ids, attention_mask=m, image_token_id=IMAGE, video_token_id=VIDEO,
                                 spatial_merge_size=2)
        assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])


def test_forward_uses_the_mrope_positions(model, processor, media):
    """The positions the forward computes are get_rope_index's: passing them explicitly gives the same logits, and
    plain 1-D positions give different ones (so the grid positions matter)."""
    inputs = encode(processor, [conversation(f"video={media['clip']}", f"image={media['wide']}", "text:q")])
    pos, delta = model.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
                                            inputs["attention_mask"], inputs["second_per_grid_ts"])
    with torch.no_grad():
        implicit = model(**inputs)
        explicit = model(**inputs, position_ids=pos)
        flat = model(**inputs, position_ids=torch.arange(pos.shape[-1]).expand(3, 1, -1))
    assert torch.equal(implicit.rope_deltas, delta)
    torch.testing.assert_close(implicit.logits, explicit.logits, rtol=0, atol=0)
    assert not torch.allclose(implicit.logits, flat.logits, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# DeepStack and gates


def _layer_io(model, inputs, layer):
    """(output of text layer ``layer``, input of the next stage) for one forward: their difference is exactly what
    was added after that layer."""
    lm = model.model.language_model
    seen = {}
    h1 = lm.layers[layer].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.detach().clone()))
    nxt = lm.layers[layer + 1] if layer + 1 < len(lm.layers) else lm.norm
    h2 = nxt.register_forward_pre_hook(lambda m, a: seen.__setitem__("next_in", a[0].detach().clone()))
    with torch.no_grad():
        model(**inputs)
    h1.remove()
    h2.remove()
    return seen["out"], seen["next_in"]


def _deepstack_rows(model, inputs):
    """Per level, the DeepStack rows in sequence order (videos and images interleaved as they appear)."""
    with torch.no_grad():
        img = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        vid = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    ids = inputs["input_ids"]
    visual = (ids == IMAGE) | (ids == VIDEO)
    is_image = (ids == IMAGE)[visual]
    levels = []
    for i_level, v_level in zip(img.deepstack_features, vid.deepstack_features):
        rows = torch.zeros(int(visual.sum()), i_level.shape[-1])
        rows[is_image], rows[~is_image] = i_level, v_level
        levels.append(rows)
    return visual, levels


def test_deepstack_adds_levels_at_their_text_layers(tiny_model, processor, media):
    # Both levels after text layer 1: they are summed; layer 0 gets nothing. Video before image in the prompt, so
    # rows must follow sequence order, not modality order.
    model = tiny_model(seed=1, deepstack_text_layers=[1, 1])
    inputs = encode(processor, [conversation("text:first", f"video={media['clip']}", f"image={media['square']}",
                                             "text:after")])
    visual, levels = _deepstack_rows(model, inputs)
    out0, in1 = _layer_io(model, inputs, 0)
    assert torch.equal(out0, in1)  # nothing after layer 0
    out1, in2 = _layer_io(model, inputs, 1)
    added = (in2 - out1)[0]
    assert torch.equal(added[~visual[0]], torch.zeros_like(added[~visual[0]]))  # exactly zero off the visual tokens
    torch.testing.assert_close(added[visual[0]], levels[0] + levels[1], rtol=1e-5, atol=1e-5)


def test_deepstack_reaches_only_visual_positions_then_flows_causally(tiny_model, processor, media):
    """Against the same model with DeepStack features zeroed: up to the injection layer every state is identical;
    right after it only the visual positions differ; later, positions before the first visual token never change
    (causal attention), while visual and later positions do."""
    with_ds = tiny_model(seed=2, deepstack_text_layers=[0, 1])
    without = copy.deepcopy(with_ds)
    for merger in without.model.visual.deepstack_mergers:
        torch.nn.init.zeros_(merger.mlp[2].weight)
        torch.nn.init.zeros_(merger.mlp[2].bias)
    inputs = encode(processor, [conversation("text:some words before the image", f"image={media['wide']}",
                                             "text:and after")])
    visual = ((inputs["input_ids"] == IMAGE) | (inputs["input_ids"] == VIDEO))[0]
    first = int(visual.nonzero()[0])
    a_out0, a_in1 = _layer_io(with_ds, inputs, 0)
    b_out0, b_in1 = _layer_io(without, inputs, 0)
    torch.testing.assert_close(a_out0, b_out0, rtol=0, atol=0)  # before any injection: identical
    diff = (a_in1 - b_in1)[0].abs().amax(-1)
    assert (diff[visual] > 0).all() and (diff[~visual] == 0).all()
    with torch.no_grad():
        a = with_ds(**inputs, output_hidden_states=True).hidden_states[-1][0]
        b = without(**inputs, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(a[:first], b[:first], rtol=1e-6, atol=1e-6)
    assert ((a[first:] - b[first:]).abs().amax(-1) > 1e-6).all()


def test_gates_scale_the_deepstack_addition(tiny_model, processor, media):
    model = tiny_model(seed=3, text={"use_gated_cross_attention": True, "gated_cross_attention_start_layer": 1},
                       deepstack_text_layers=[0, 2])
    gates = torch.tensor([0.7, -0.4, 1.3])
    with torch.no_grad():
        model.model.language_model.visual_gates.copy_(gates)
    inputs = encode(processor, [conversation(f"video={media['clip']}", f"image={media['tall']}", "text:q")])
    visual, levels = _deepstack_rows(model, inputs)
    out0, in1 = _layer_io(model, inputs, 0)
    assert torch.equal(out0, in1)  # layer 0 is before gated_cross_attention_start_layer: its level is skipped
    out2, norm_in = _layer_io(model, inputs, 2)
    added = (norm_in - out2)[0]
    torch.testing.assert_close(added[visual[0]], torch.sigmoid(gates[2]) * levels[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(added[~visual[0]], torch.zeros_like(added[~visual[0]]))


# ----------------------------------------------------------------------------------------------------------------
# Loss


def test_loss_ignores_visual_positions_and_trains_both_towers(tiny_model, processor, media):
    model = tiny_model(seed=4).train()
    inputs = encode(processor, [conversation(f"image={media['square']}", "text:a caption", f"video={media['clip']}")])
    labels = inputs["input_ids"].clone()  # the user did not mask the placeholders
    out = model(**inputs, labels=labels)
    masked = labels.masked_fill((labels == IMAGE) | (labels == VIDEO), -100)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), masked[0, 1:], ignore_index=-100)
    unmasked = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:])
    torch.testing.assert_close(out.loss, expected)
    assert not torch.isclose(out.loss, unmasked)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.model.visual.deepstack_mergers[0].mlp[0].weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_placeholder_count_mismatch_reports_counts(model, processor, media):
    inputs = encode(processor, [conversation(f"image={media['wide']}", "text:q")])
    ids = inputs["input_ids"]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[int((ids[0] == IMAGE).nonzero()[0])] = False  # one placeholder lost (e.g. by truncation)
    bad = {**inputs, "input_ids": ids[:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
    with pytest.raises(ValueError, match=r"found 5 image placeholder tokens .* give 6 visual tokens"):
        model(**bad)


def test_video_and_image_mismatch_both_reported(model, processor, media):
    inputs = encode(processor, [conversation(f"image={media['wide']}", f"video={media['clip']}")])
    ids = inputs["input_ids"].clone()
    ids[ids == VIDEO] = 11  # every video placeholder replaced by text
    ids[0, int((ids[0] == IMAGE).nonzero()[-1]) + 2] = IMAGE  # one extra image placeholder
    with pytest.raises(ValueError) as err:
        model(**{**inputs, "input_ids": ids})
    message = str(err.value)
    assert "found 7 image placeholder tokens" in message and "give 6 visual tokens" in message
    assert "found 0 video placeholder tokens" in message and "give 8 visual tokens" in message


def test_runs_must_match_items_in_order(model, processor, media):
    inputs = encode(processor, [conversation(f"image={media['square']}", "text:x", f"image={media['wide']}")])
    rows = inputs["image_grid_thw"].prod(-1).tolist()  # [16, 24] patch rows -> runs of 4 and 6 tokens
    swapped_pixels = torch.cat([inputs["pixel_values"][rows[0]:], inputs["pixel_values"][:rows[0]]])
    bad = {**inputs, "pixel_values": swapped_pixels, "image_grid_thw": inputs["image_grid_thw"].flip(0)}
    with pytest.raises(ValueError, match=r"runs have lengths \[4, 6\] but the images give \[6, 4\]"):
        model(**bad)


def test_bad_media_arguments(model, processor, media):
    inputs = encode(processor, [conversation(f"image={media['wide']}", "text:q")])
    with pytest.raises(ValueError, match="pixel_values was given without image_grid_thw"):
        model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match=r"image_grid_thw \[\[1, 4, 4\]\] describes 16 patch rows .* has 24 rows"):
        model(**{**inputs, "image_grid_thw": torch.tensor([[1, 4, 4]])})
    with pytest.raises(ValueError, match="pixel_values_videos was given without video_grid_thw"):
        model(input_ids=inputs["input_ids"][:, :3], pixel_values_videos=inputs["pixel_values"])


def test_placeholders_without_media_are_plain_tokens(model, processor, media):
    """transformers' contract (assisted decoding, generated placeholder ids): ids without media are just tokens, the
    decoder reads their embeddings at text positions."""
    inputs = encode(processor, [conversation(f"image={media['wide']}", "text:q")])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert int((ids == IMAGE).sum()) == 6
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        text = model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(logits, model.lm_head(text), rtol=0, atol=0)
    with pytest.raises(ValueError, match="found 6 image placeholder tokens .* give 4 visual tokens"):
        square = encode(processor, [conversation(f"image={media['square']}", "text:q")])
        model(input_ids=ids, attention_mask=mask, pixel_values=square["pixel_values"],
              image_grid_thw=square["image_grid_thw"])


def test_text_only_checkpoint_is_refused_by_the_vlm_class(tmp_path):
    text = ArlowForCausalLM(ArlowTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2))
    text.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="arlow create-model"):
        ArlowForConditionalGeneration.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Text-only behaviour, attention backends, save/load


def test_text_only_input_matches_the_text_model(model):
    """With no media the VLM is its decoder: identical logits to an ArlowForCausalLM with the same weights."""
    text = ArlowForCausalLM(model.config.text_config).eval()
    text.model.load_state_dict(model.model.language_model.state_dict())
    text.lm_head.load_state_dict(model.lm_head.state_dict())
    ids = torch.randint(0, 8000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = text(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)


def test_per_tower_attention_implementation(tiny_config, processor, media):
    torch.manual_seed(5)
    config = tiny_config("vlm")
    mixed = ArlowForConditionalGeneration._from_config(
        config, attn_implementation={"vision_config": "eager", "text_config": "sdpa"}).eval()
    assert mixed.model.visual.config is mixed.config.vision_config
    assert mixed.model.visual.config._attn_implementation == "eager"
    assert mixed.model.language_model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(mixed)
    eager.set_attn_implementation("eager")
    assert eager.model.language_model.config._attn_implementation == "eager"
    inputs = encode(processor, [conversation(f"image={media['wide']}", "text:q"), conversation("text:longer q here")])
    real = inputs["attention_mask"].bool()  # padded slots attend to nothing: backends may differ there
    with torch.no_grad():
        torch.testing.assert_close(mixed(**inputs).logits[real], eager(**inputs).logits[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_through_auto_classes(tiny_model, tmp_path, processor, media, tie):
    model = tiny_model(seed=6, tie_word_embeddings=tie)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.visual.") for k in saved)
    assert any(k.startswith("model.language_model.") for k in saved)
    assert ("lm_head.weight" in saved) != tie  # tied: only the embedding is written
    inputs = encode(processor, [conversation(f"video={media['clip']}", f"image={media['tall']}", "text:q")])
    with torch.no_grad():
        expected = model(**inputs)
        for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
            loaded = auto.from_pretrained(tmp_path).eval()
            assert type(loaded) is ArlowForConditionalGeneration
            assert torch.equal(loaded(**inputs).logits, expected.logits)
            if tie:
                assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
        base = AutoModel.from_pretrained(tmp_path).eval()
        assert type(base) is ArlowModel
        hidden = base(**inputs).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), expected.logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Assembly from an exported encoder + a text model


def _tiny_export(tmp_path, hidden=64):
    from arlow.pretrain.export import export_checkpoint
    from arlow.pretrain.mae import ArlowMAEConfig, ArlowMAEForPreTraining

    torch.manual_seed(7)
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, deepstack_visual_indexes=[1])
    mae = ArlowMAEForPreTraining(ArlowMAEConfig(vision_config=vision, decoder_hidden_size=32, decoder_num_layers=1,
                                                decoder_num_heads=2))
    return export_checkpoint(mae, tmp_path / "checkpoint-1", {"step": 1}), mae.encoder


def _tiny_text_dir(tmp_path, vocab=VOCAB, tie=False, name="text"):
    torch.manual_seed(8)
    text = ArlowForCausalLM(ArlowTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=tie))
    text.save_pretrained(tmp_path / name)
    return tmp_path / name, text


def test_assembly_copies_every_source_weight(tmp_path, processor, media):
    checkpoint, encoder = _tiny_export(tmp_path)
    text_dir, text = _tiny_text_dir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = create_model(tmp_path / "vlm", vision_encoder=checkpoint, text_model=text_dir)
    assert any("built-in tokenizer" in str(w.message) for w in caught)  # the text folder had none
    assert out.stat().st_mode & 0o777 == 0o755  # readable by others, weights included
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir() if f.is_file())
    vlm = AutoModelForImageTextToText.from_pretrained(out).eval()
    for name, value in encoder.state_dict().items():
        assert torch.equal(vlm.model.visual.state_dict()[name], value), name
    for name, value in text.model.state_dict().items():
        assert torch.equal(vlm.model.language_model.state_dict()[name], value), name
    assert torch.equal(vlm.lm_head.weight, text.lm_head.weight)
    assert vlm.config.deepstack_text_layers == [0]
    # The folder is complete: the processor loads and drives the model.
    from transformers import AutoProcessor

    loaded_processor = AutoProcessor.from_pretrained(out)
    inputs = loaded_processor.apply_chat_template(conversation(f"image={media['square']}", "text:hi"),
                                                  add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        generated = vlm.generate(**inputs, max_new_tokens=2)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0


@pytest.mark.filterwarnings("ignore:.*has no tokenizer")
def test_assembly_checks_widths_tokens_and_weights(tmp_path):
    checkpoint, _ = _tiny_export(tmp_path, hidden=48)
    text_dir, _ = _tiny_text_dir(tmp_path)
    with pytest.raises(ValueError, match=r"vision hidden_size = 48\) differs from the text model's hidden_size \(64\)"):
        assemble(checkpoint, text_dir)
    checkpoint, encoder = _tiny_export(tmp_path / "ok")

    # A text model whose tokenizer lacks the multimodal/chat tokens: they are added and the embeddings grow.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(59)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    small_dir, small = _tiny_text_dir(tmp_path, vocab=60, tie=True, name="small")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(small_dir)
    with pytest.warns(UserWarning, match="lacked the special tokens"):
        vlm, proc = assemble(checkpoint, small_dir)
    assert vlm.config.text_config.vocab_size == 66 and len(proc.tokenizer) == 66
    assert [vlm.config.image_token_id, vlm.config.video_token_id] == [proc.image_token_id, proc.video_token_id]
    embed = vlm.get_input_embeddings().weight
    assert torch.equal(embed[:60], small.model.embed_tokens.weight)
    torch.testing.assert_close(embed[60:], small.model.embed_tokens.weight.mean(0).expand(6, -1))
    assert vlm.lm_head.weight.data_ptr() == embed.data_ptr()  # tied in the source, tied in the VLM

    # A weight missing from the source is an error, not a silent random init.
    state = load_file(str(text_dir / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"left 1 weights without a source .*layers\.1\.mlp\.up_proj"):
        assemble(checkpoint, text_dir)
    with pytest.raises(ValueError, match="'arlow_text' one is needed"):
        assemble(checkpoint, checkpoint / "vision_encoder")


def test_flop_formulas_count_every_decoder_matrix(tiny_model):
    """``decoder_forward_flops`` is 2 FLOPs per weight of every layer matrix and the LM head per token (the dense
    rule); ``vlm_forward_flops`` adds the encoder's formula."""
    from arlow.modeling.multimodal import vlm_forward_flops
    from arlow.modeling.text import decoder_forward_flops
    from arlow.modeling.vision import vision_forward_flops

    model = tiny_model()
    text = model.config.text_config
    weights = sum(m.weight.numel() for name, m in model.model.language_model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
    weights += text.hidden_size * text.vocab_size
    assert decoder_forward_flops(text, 10) == 2 * weights * 10
    assert vlm_forward_flops(model.config, 10, [16, 64]) == \
        decoder_forward_flops(text, 10) + vision_forward_flops(model.config.vision_config, [16, 64])
    assert vlm_forward_flops(model.config, 10, []) == decoder_forward_flops(text, 10)


def test_bad_inputs_get_one_clear_error(model, processor, media):
    prompt = processor(text="hi", return_tensors="pt")
    for ids, message in ((torch.tensor([[1, VOCAB + 5]]), f"token id {VOCAB + 5}, outside the vocabulary \\[0, {VOCAB}\\)"),
                         (torch.tensor([[1, -3]]), "token id -3, outside the vocabulary"),
                         (torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
                         (torch.zeros(0, 5, dtype=torch.long), r"input_ids is empty \(shape \(0, 5\)\)")):
        with pytest.raises(ValueError, match=message):
            model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(**processor(text="", return_tensors="pt"), max_new_tokens=2)
    assert prompt["input_ids"].numel() > 0
    with pytest.raises(ValueError, match="images='' is empty: to process a prompt pass it as text="):
        processor("")
    with pytest.raises(ValueError, match=r"text=\[\] holds no prompt"):
        processor(text=[])
    with pytest.raises(ValueError, match="the conversation is empty"):
        processor.apply_chat_template([], tokenize=True, return_dict=True)
    audio = [{"role": "user", "content": [{"type": "audio", "path": "x.wav"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="audio content is not supported"):
        processor.apply_chat_template(audio, tokenize=True, return_dict=True)
    inputs = processor.apply_chat_template(conversation(f"image={media['square']}", "text:hi"), tokenize=True,
                                           return_dict=True, return_tensors="pt", add_generation_prompt=True)
    inputs["pixel_values"] = torch.full_like(inputs["pixel_values"], float("nan"))
    with pytest.raises(ValueError, match="pixel_values hold NaN or inf values"):
        model.generate(**inputs, max_new_tokens=2)
