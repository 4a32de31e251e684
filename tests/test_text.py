"""Text decoder, heads and generation: every check compares against an independent computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    StaticCache,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import arlow  # noqa: F401  (registers the Auto classes)
from arlow import (
    ArlowForCausalLM,
    ArlowForQuestionAnswering,
    ArlowForSequenceClassification,
    ArlowForTokenClassification,
    ArlowTextConfig,
    ArlowTextModel,
)
from arlow.modeling.rope import mrope_slot_axes
from arlow.modeling.text import ArlowRMSNorm, ArlowTextRotaryEmbedding

VOCAB = 101
PAD = 0
BACKENDS = ["eager", "sdpa"]


@pytest.fixture
def build(tiny_config):
    """``build(cls, impl, seed, **overrides)``: a seeded model of the tiny text config (conftest's ``tiny_config``:
    3 layers full/sliding/sliding, GQA 4q/2kv, head_dim 12, window 4, an init large enough that argmax never ties)."""

    def make(cls=ArlowForCausalLM, impl="sdpa", seed=0, **overrides):
        torch.manual_seed(seed)
        return cls._from_config(tiny_config("text", **overrides), attn_implementation=impl).eval()

    return make


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 3, 88, 41, 9, 23], [61, 2, 45], [7, 7, 30, 12, 99]]


# --------------------------------------------------------------------------------------------- reference


def reference_logits(model: ArlowForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The whole decoder written out independently: complex-number RoPE, explicit banded causal mask, GQA by
    index arithmetic. ``ids, mask (B, S)`` -> logits ``(B, S, V)``; rows of padding queries are garbage."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    b, s = ids.shape
    d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    pos = (mask.cumsum(-1) - 1).clamp(min=0).double()  # (B, S)
    inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    rot = torch.polar(torch.ones(b, s, d // 2, dtype=torch.float64), pos[..., None] * inv)  # (B, S, D/2)

    def rope(x):  # (B, S, h, D): channel c pairs with c + D/2 as one complex number
        z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot[:, :, None]
        return torch.cat([z.real, z.imag], -1)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    q_idx = torch.arange(s)[:, None]
    k_idx = torch.arange(s)[None, :]
    allowed = {
        "full_attention": (k_idx <= q_idx),
        "sliding_attention": (k_idx <= q_idx) & (k_idx > q_idx - cfg.sliding_window),
    }
    h = sd["model.embed_tokens.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = rope((x @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, nh, d))
        k = rope((x @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, nkv, d))
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, nkv, d)
        band = allowed[cfg.layer_types[layer]][None] & mask.bool()[:, None, :]  # (B, S, S)
        heads = []
        for head in range(nh):
            g = head // (nh // nkv)
            scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, g]) / math.sqrt(d)
            scores = scores.masked_fill(~band, -math.inf)
            heads.append(torch.einsum("bqk,bkd->bqd", torch.softmax(scores, -1).nan_to_num(), v[:, :, g]))
        h = h + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        act = F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + act @ sd[p + "mlp.down_proj.weight"].T
    h = rms(h, sd["model.norm.weight"])
    return (h @ sd["lm_head.weight"].T).float()


@pytest.mark.parametrize("impl", BACKENDS)
def test_sliding_window_matches_banded_reference_prefill_and_decode(build, impl):
    model = build(impl=impl)
    ids, mask = left_pad(PROMPTS)
    extra = torch.randint(1, VOCAB, (3, 6))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    ref = reference_logits(model, full_ids, full_mask)
    real = full_mask.bool()
    with torch.no_grad():
        prefill = model(full_ids, attention_mask=full_mask).logits
        assert torch.allclose(prefill[real], ref[real], atol=1e-4)
        # Decode one token at a time past the window (window 4, 13 tokens): every step sees its band only.
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        for t in range(extra.shape[1]):
            step_mask = full_mask[:, : ids.shape[1] + t + 1]
            step = model(extra[:, t: t + 1], attention_mask=step_mask, past_key_values=cache, use_cache=True)
            assert torch.allclose(step.logits[:, 0], ref[:, ids.shape[1] + t], atol=1e-4), (impl, t)


# --------------------------------------------------------------------------------------------- cache, backends


@pytest.mark.parametrize("impl", BACKENDS)
def test_cached_decode_equals_full_forward_every_step(build, impl):
    model = build(impl=impl)
    ids, mask = left_pad(PROMPTS)
    seq = torch.cat([ids, torch.randint(1, VOCAB, (3, 7))], 1)
    seq_mask = torch.cat([mask, torch.ones(3, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(seq, attention_mask=seq_mask).logits
        cache = DynamicCache(config=model.config)
        n0 = ids.shape[1]
        out = model(seq[:, :n0], attention_mask=seq_mask[:, :n0], past_key_values=cache, use_cache=True)
        real = mask.bool()  # rows of padding queries attend to nothing real: not compared
        assert torch.allclose(out.logits[real], full[:, :n0][real], atol=1e-5)
        for t in range(n0, seq.shape[1]):
            step = model(seq[:, t: t + 1], attention_mask=seq_mask[:, : t + 1], past_key_values=cache, use_cache=True)
            assert torch.allclose(step.logits[:, 0], full[:, t], atol=1e-5), (impl, t)


def test_eager_equals_sdpa_with_padding_and_windows(build):
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        eager = build(impl="eager")(ids, attention_mask=mask).logits
        sdpa = build(impl="sdpa")(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(eager[real], sdpa[real], atol=1e-5)


def test_attention_implementation_switch_and_flash_flag(tiny_config, build):
    model = build(impl="eager")
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        eager = model(ids).logits
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        assert torch.allclose(model(ids).logits, eager, atol=1e-5)
    assert ArlowForCausalLM._supports_flash_attn and ArlowForCausalLM._supports_sdpa
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        # Supported by the class; only the missing package stops it (not a "does not support" ValueError).
        with pytest.raises(ImportError, match="FlashAttention2"):
            ArlowForCausalLM._from_config(tiny_config("text"), attn_implementation="flash_attention_2")


# --------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("impl", BACKENDS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(build, impl):
    model = build(impl=impl)
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    batch = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([prompt]), **kw)[0, len(prompt):]
        assert batch[row].tolist() == alone.tolist(), (impl, row)


def test_static_cache_generates_like_dynamic_cache(build):
    model = build(impl="sdpa")
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    dynamic = model.generate(ids, attention_mask=mask, **kw)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)
    no_cache = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(dynamic, no_cache)


def test_static_cache_accepts_mask_dict_from_generate(build):
    """A static cache makes generate pass {layer_type: 4-D mask}; logits match the dynamic path."""
    model = build(impl="eager")
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        inputs = model.prepare_inputs_for_generation(
            ids, past_key_values=cache, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True, is_first_iteration=True,
        )
        assert isinstance(inputs["attention_mask"], dict)
        out = model(**inputs).logits
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5)


def test_beam_search_and_sampling_are_deterministic_and_cache_consistent(build):
    model = build(impl="sdpa")
    ids, mask = left_pad(PROMPTS[:2])
    beam = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    a = model.generate(ids, attention_mask=mask, **beam)
    b = model.generate(ids, attention_mask=mask, use_cache=False, **beam)
    assert a.shape == (2, ids.shape[1] + 6) and torch.equal(a, b)

    sample = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=1.5, pad_token_id=PAD)
    runs = []
    for seed, use_cache in [(3, True), (3, False), (4, True)]:
        torch.manual_seed(seed)
        runs.append(model.generate(ids, attention_mask=mask, use_cache=use_cache, **sample))
    assert torch.equal(runs[0], runs[1])  # same seed, with or without cache
    assert not torch.equal(runs[0], runs[2])  # a different seed draws differently


# --------------------------------------------------------------------------------------------- positions, RoPE


def test_three_and_four_row_positions_with_equal_rows_equal_1d(build):
    model = build()
    ids = torch.randint(1, VOCAB, (2, 9))
    pos = torch.arange(3, 12).expand(2, -1)
    with torch.no_grad():
        one = model(ids, position_ids=pos).logits
        three = model(ids, position_ids=pos[None].expand(3, -1, -1)).logits
        four = model(ids, position_ids=pos[None].expand(4, -1, -1)).logits
        skewed = pos[None].expand(3, -1, -1).clone()
        skewed[1, :, 4:] += 5  # a constant shift would cancel out (relative positions)
        other = model(ids, position_ids=skewed).logits
    assert torch.equal(one, three) and torch.equal(one, four)
    assert not torch.allclose(one, other, atol=1e-3)  # the h row really drives its slots


def test_mrope_angles_follow_slot_axes(tiny_config):
    cfg = tiny_config("text")
    rotary = ArlowTextRotaryEmbedding(cfg)
    pos = torch.tensor([[[0, 4, 9]], [[1, 2, 3]], [[7, 7, 0]]])  # (3, B=1, S=3)
    cos, sin = rotary(torch.zeros(1), pos)
    axes = mrope_slot_axes(cfg.mrope_sections)
    expected = torch.stack([pos[axes[j], 0] * rotary.inv_freq[j] for j in range(len(axes))], -1)  # (S, D/2)
    angle = torch.atan2(sin[0], cos[0])[:, : cfg.head_dim // 2]
    wrapped = torch.remainder(expected + math.pi, 2 * math.pi) - math.pi
    assert torch.allclose(angle, wrapped, atol=1e-5)
    assert sorted(set(axes.tolist())) == [0, 1, 2]


def test_model_rotary_has_relative_position_property(tiny_config):
    from arlow.modeling.rope import apply_rotary

    cfg = tiny_config("text")
    rotary = ArlowTextRotaryEmbedding(cfg)
    q, k = torch.randn(2, cfg.head_dim, dtype=torch.float64).float()

    def score(m, n, rows=1):
        pos = torch.tensor([[m, n]])
        if rows == 3:
            pos = pos[None].expand(3, -1, -1)
        cos, sin = rotary(q, pos)
        return (apply_rotary(q, cos[0, 0], sin[0, 0]) * apply_rotary(k, cos[0, 1], sin[0, 1])).sum()

    assert torch.allclose(score(5, 3), score(12, 10), atol=1e-5)
    assert torch.allclose(score(0, 0), score(7, 7), atol=1e-5)
    assert torch.allclose(score(20, 3, rows=3), score(40, 23, rows=3), atol=1e-5)
    assert not torch.allclose(score(5, 3), score(5, 4), atol=1e-3)
    cos, sin = rotary(q, torch.tensor([[17]]))
    assert torch.allclose(apply_rotary(q, cos[0, 0], sin[0, 0]).norm(), q.norm(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("size", ["small", "large"])  # plain formula below 2**16 elements, fused buffer above
def test_apply_rotary_equals_the_rotation_formula_with_gradients(dtype, size):
    """rope.apply_rotary == x*cos + rotate_half(x)*sin in fp32 (fp64), values and gradients, with broadcasting."""
    from arlow.modeling.rope import apply_rotary, rotate_half

    seq = 4 if size == "small" else 128
    angles = torch.rand(2, 1, seq, 32, dtype=torch.float64) * 30
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = cos.to(compute), sin.to(compute)

    def formula(x):
        xf = x.to(compute)
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    x = torch.randn(2, 8, seq, 64).to(dtype)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(apply_rotary(x, cos, sin), formula(x), atol=tol, rtol=tol)
    for shape in [(2, 8, seq, 64), (8, seq, 64)]:  # the second is broadcast against the (2, 1, seq, 64) tables
        xa = torch.randn(shape, dtype=compute, requires_grad=True)
        xb = xa.detach().clone().requires_grad_()
        grad = torch.randn(2, 8, seq, 64, dtype=compute)
        (apply_rotary(xa, cos, sin) * grad).sum().backward()
        (formula(xb) * grad).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=max(tol, 1e-5), rtol=1e-5)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_variants_use_transformers_init_and_survive_save_load(build, rope, tmp_path):
    model = build(rope_parameters={"rope_theta": 10000.0, **rope})
    rotary = model.model.rotary_emb
    inv, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](model.config)
    assert torch.allclose(rotary.inv_freq, inv) and rotary.attention_scaling == pytest.approx(scaling)
    cos, sin = rotary(inv, torch.arange(5)[None])
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, scaling**2), atol=1e-5)
    ids = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, rotary.inv_freq)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    if rope["rope_type"] == "dynamic":  # positions beyond max_position_embeddings re-scale the table
        before = rotary.inv_freq.clone()
        rotary(inv, torch.tensor([[200]]))
        assert not torch.allclose(rotary.inv_freq, before)


def test_bad_inputs_raise_clear_errors(tiny_config, build):
    model = build()
    ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="position_ids has shape"):
        model(ids, position_ids=torch.zeros(2, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of"):
        model(ids, inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ArlowForCausalLM(tiny_config("text", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.5}))


# --------------------------------------------------------------------------------------------- heads


def test_parameter_names_follow_the_fork(build):
    model = build(attention_bias=True, use_gated_cross_attention=True, num_hidden_layers=2)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"model.embed_tokens.weight": (VOCAB, 32), "model.norm.weight": (32,), "lm_head.weight": (VOCAB, 32),
                "model.visual_gates": (2,)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        expected.update({
            p + "self_attn.q_proj.weight": (48, 32), p + "self_attn.q_proj.bias": (48,),
            p + "self_attn.k_proj.weight": (24, 32), p + "self_attn.k_proj.bias": (24,),
            p + "self_attn.v_proj.weight": (24, 32), p + "self_attn.v_proj.bias": (24,),
            p + "self_attn.o_proj.weight": (32, 48),
            p + "mlp.gate_proj.weight": (48, 32), p + "mlp.up_proj.weight": (48, 32),
            p + "mlp.down_proj.weight": (32, 48),
            p + "input_layernorm.weight": (32,), p + "post_attention_layernorm.weight": (32,),
        })
    assert names == expected
    assert torch.equal(model.model.visual_gates, torch.zeros(2))


def test_causal_lm_loss_is_fp32_shifted_cross_entropy_with_ignore_index(build):
    model = build()
    ids = torch.randint(1, VOCAB, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 8, VOCAB)
    expected = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    kept = model(ids, logits_to_keep=1).logits
    assert kept.shape == (2, 1, VOCAB) and torch.allclose(kept[:, 0], out.logits[:, -1], atol=1e-6)


def test_sequence_classification_pools_last_non_pad_token(build):
    model = build(ArlowForSequenceClassification, num_labels=3)
    assert "score.bias" not in model.state_dict() and model.score.weight.shape == (3, 32)
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != PAD).long()
    labels = torch.tensor([2, 0])
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 3)
    hidden = model.model(ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out.logits, model.score(hidden[:, -1]), atol=1e-6)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels), atol=1e-6)


def test_token_classification_and_question_answering_heads(build):
    tok = build(ArlowForTokenClassification, num_labels=5)
    assert tok.score.bias is not None and tok.score.weight.shape == (5, 32)
    ids = torch.randint(1, VOCAB, (2, 6))
    labels = torch.randint(0, 5, (2, 6))
    labels[1, 4:] = -100
    out = tok(ids, labels=labels)
    assert out.logits.shape == (2, 6, 5)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)), atol=1e-6)

    qa = build(ArlowForQuestionAnswering)
    assert set(k for k in qa.state_dict() if not k.startswith("model.")) == {"qa_outputs.weight", "qa_outputs.bias"}
    start, end = torch.tensor([1, 4]), torch.tensor([3, 5])
    out = qa(ids, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 6)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_hidden_states_and_attentions_outputs(build):
    model = build(impl="eager")
    ids = torch.randint(1, VOCAB, (2, 6))
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert out.attentions[1].shape == (2, 4, 6, 6)
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(2, 4, 6), atol=1e-5)
    assert out.attentions[1][0, 0, 5, :2].abs().max() == 0  # window 4: token 5 cannot see tokens 0, 1
    tuple_out = model(ids, return_dict=False)
    assert torch.equal(tuple_out[0], out.logits)


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "cls, auto",
    [
        (ArlowTextModel, AutoModel),
        (ArlowForCausalLM, AutoModelForCausalLM),
        (ArlowForSequenceClassification, AutoModelForSequenceClassification),
        (ArlowForTokenClassification, AutoModelForTokenClassification),
        (ArlowForQuestionAnswering, AutoModelForQuestionAnswering),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_save_load_round_trip_through_auto_classes(build, cls, auto, tmp_path):
    model = build(cls, num_labels=3, use_gated_cross_attention=True)
    with torch.no_grad():
        model.model.visual_gates.fill_(0.3) if cls is not ArlowTextModel else model.visual_gates.fill_(0.3)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(ids)
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is ArlowTextConfig
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        out = loaded(ids)
    for name in ("logits", "last_hidden_state", "start_logits"):
        if name in ref:
            assert torch.equal(out[name], ref[name]), name


def test_tied_embeddings_save_only_the_source_and_reload_tied(build, tmp_path):
    model = build(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = ArlowForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    untied = build(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_dtype_and_device_map_loading(build, tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, VOCAB, (2, 7))
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref = model(ids).logits
        low = bf16(ids).logits
        gen = bf16.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert low.dtype == torch.bfloat16 and gen.shape == (2, 10)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, ref)


def test_rmsnorm_statistics_in_fp32_then_cast_then_weight():
    norm = ArlowRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    x = (torch.randn(3, 8) * 50).bfloat16()
    xf = x.float()
    expected = norm.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(x), expected)


# --------------------------------------------------------------------------------------------- training


def test_gradient_checkpointing_recomputes_and_gives_same_gradients(build):
    model = build(initializer_range=0.05)
    model.train()
    ids = torch.randint(1, VOCAB, (2, 8))

    def run():
        """Gradients, the number of tensors autograd kept during forward, and how often layer 1's MLP started."""
        model.zero_grad()
        calls, saved = [], []
        hook = model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
        hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(saved), len(calls)

    plain, plain_saved, plain_calls = run()
    model.activation_checkpointing_enable()
    ckpt, ckpt_saved, ckpt_calls = run()
    assert plain_calls == 1 and ckpt_calls == 2  # the layer ran again during backward
    assert ckpt_saved < plain_saved / 2  # and its activations were not kept
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


@pytest.mark.parametrize("field", ["attention_dropout", "resid_dropout", "mlp_dropout"])
def test_each_dropout_acts_in_training_only(build, field):
    model = build(**{field: 0.5})
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        ref = build()(ids).logits
        assert torch.equal(model(ids).logits, ref)  # eval: identity
        model.train()
        assert not torch.allclose(model(ids).logits, ref, atol=1e-4)


# --------------------------------------------------------------------------------------------- DeepStack


def _capture_inputs(module):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("gated", [False, True])
def test_deepstack_adds_exactly_at_visual_positions(build, gated):
    model = build(ArlowTextModel, use_gated_cross_attention=gated,
                  gated_cross_attention_start_layer=1 if gated else None)
    if gated:
        with torch.no_grad():
            model.visual_gates.copy_(torch.tensor([2.0, -1.0, 0.5]))
    ids = torch.randint(1, VOCAB, (2, 6))
    vis = torch.zeros(2, 6, dtype=torch.bool)
    vis[0, 1:3] = True
    vis[1, 4] = True
    feats = {layer: torch.randn(3, 32) for layer in (0, 1, 2)}
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states  # layer outputs without additions
    # Re-run with DeepStack; the input of layer 2 must be layer 1's output plus the (gated) rows at `vis`.
    seen2, h2 = _capture_inputs(model.layers[2])
    seen1, h1 = _capture_inputs(model.layers[1])
    seen_norm, h3 = _capture_inputs(model.norm)
    last = {}
    h4 = model.layers[2].register_forward_hook(lambda m, a, out: last.setdefault("y", out.detach().clone()))
    with torch.no_grad():
        out = model(ids, visual_pos_masks=vis, deepstack_visual_embeds=feats, output_hidden_states=True)
    for h in (h1, h2, h3, h4):
        h.remove()

    def scale(layer):
        return torch.sigmoid(model.visual_gates[layer]) if gated else 1.0

    expected_in1 = plain[1].clone()
    if not gated:  # gated: start layer 1 skips the layer-0 addition
        expected_in1[vis] += feats[0]
    assert torch.allclose(seen1["x"], expected_in1, atol=1e-6)
    expected_in2 = out.hidden_states[2].clone()
    expected_in2[vis] += scale(1) * feats[1]
    assert torch.allclose(seen2["x"], expected_in2, atol=1e-6)
    expected_norm_in = last["y"].clone()  # hidden_states[-1] is the normed output
    expected_norm_in[vis] += scale(2) * feats[2]
    assert torch.allclose(seen_norm["x"], expected_norm_in, atol=1e-6)
    # Non-visual positions of layer 1's input are untouched.
    assert torch.equal(seen1["x"][~vis], plain[1][~vis])


def test_deepstack_gradients_flow_and_inputs_are_checked(build):
    model = build(ArlowTextModel, use_gated_cross_attention=True)
    model.train()
    ids = torch.randint(1, VOCAB, (1, 5))
    vis = torch.tensor([[False, True, True, False, False]])
    feats = torch.randn(2, 32, requires_grad=True)
    model(ids, visual_pos_masks=vis, deepstack_visual_embeds=[feats]).last_hidden_state.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert model.visual_gates.grad[0] != 0 and model.visual_gates.grad[1] == 0
    with pytest.raises(ValueError, match="one row per True entry"):
        model(ids, visual_pos_masks=vis, deepstack_visual_embeds={0: torch.randn(3, 32)})
    with pytest.raises(ValueError, match="visual_pos_masks"):
        model(ids, deepstack_visual_embeds={0: feats})
    with pytest.raises(ValueError, match="text layers"):
        model(ids, visual_pos_masks=vis, deepstack_visual_embeds={7: feats})


def test_missing_visual_gates_are_zero_after_from_pretrained(build, tmp_path):
    build(num_hidden_layers=2).save_pretrained(tmp_path)  # no gates in the checkpoint
    loaded = ArlowForCausalLM.from_pretrained(tmp_path, use_gated_cross_attention=True)
    assert torch.equal(loaded.model.visual_gates, torch.zeros(2))  # set by _init_weights, not left empty


def test_fork_causal_lm_checkpoint_loads_by_name(build, tmp_path):
    """The fork saved ArlowForCausalLM with a flat ``ArlowConfig`` (model_type "arlow"); same tensor names."""
    import json

    model = build(num_hidden_layers=2)
    model.save_pretrained(tmp_path)
    ours = json.loads((tmp_path / "config.json").read_text())
    fork = {k: v for k, v in ours.items() if k not in ("mrope_sections", "layer_types", "use_qk_norm",
                                                       "rope_parameters")}
    fork.update(model_type="arlow", rope_theta=10000.0, rope_parameters=None, _mrope_ratio=[0.33, 0.33, 0.34],
                vision_config={"model_type": "arlow", "depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4},
                mm_tokens_per_image=512)
    (tmp_path / "config.json").write_text(json.dumps(fork))
    loaded = ArlowForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_types == model.config.layer_types
    ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------------------------- last-layer shortcut


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("last_layer", ["full_attention", "sliding_attention"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_to_keep_computes_the_last_layer_at_kept_rows_only(build, impl, last_layer, padded):
    """With ``logits_to_keep=n`` the final layer runs its queries and MLP on the last ``n`` rows only: same logits and
    the same cache (so the same continuation) as the full forward, and the final MLP really sees ``n`` rows."""
    types = ["full_attention", "sliding_attention", last_layer]
    model = build(impl=impl, layer_types=types)
    ids, mask = left_pad(PROMPTS) if padded else (torch.randint(1, VOCAB, (2, 9)), None)
    seen = []
    hook = model.model.layers[-1].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        full_cache, kept_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        full = model(ids, attention_mask=mask, past_key_values=full_cache, use_cache=True).logits
        for n in (1, 3):
            kept = model(ids, attention_mask=mask, logits_to_keep=n).logits
            assert kept.shape == (ids.shape[0], n, VOCAB)
            torch.testing.assert_close(kept, full[:, -n:], atol=1e-5, rtol=1e-5)
        one = model(ids, attention_mask=mask, past_key_values=kept_cache, use_cache=True, logits_to_keep=1)
        for layer in range(len(types)):
            torch.testing.assert_close(kept_cache.layers[layer].keys, full_cache.layers[layer].keys)
            torch.testing.assert_close(kept_cache.layers[layer].values, full_cache.layers[layer].values)
        torch.testing.assert_close(one.logits[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    hook.remove()
    # full forward, n=1, n=3 (or the full rows where an unmasked sdpa call cannot align 3 query rows), cached n=1
    three = ids.shape[1] if impl == "sdpa" and not padded and last_layer == "full_attention" else 3
    assert seen == [ids.shape[1], 1, three, 1]


def test_logits_to_keep_keeps_full_outputs_when_hidden_states_are_requested(build):
    model = build()
    ids = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad():
        out = model(ids, logits_to_keep=1, output_hidden_states=True)
        ref = model(ids, output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 8, 32)
    torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1])
    torch.testing.assert_close(out.logits[:, 0], ref.logits[:, -1])
