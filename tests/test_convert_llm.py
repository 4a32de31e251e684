"""The LLM converter: tiny random Qwen2 / Qwen3 / Llama models must give the same logits after conversion."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import arlow  # noqa: F401
from arlow import ArlowForCausalLM, ArlowTextConfig
from arlow.modeling.convert_llm import convert_llm, main

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)


def save_source(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def assert_same_logits(source, dst, impl="sdpa"):
    converted = ArlowForCausalLM.from_pretrained(dst, attn_implementation=impl).eval()
    source.set_attn_implementation(impl)
    ids = torch.tensor([[0, 0, 0, 5, 9, 14, 3, 77, 41, 8, 19, 60], [12, 4, 90, 33, 7, 7, 21, 50, 6, 18, 2, 44]])
    mask = (torch.arange(12) >= torch.tensor([[3], [0]])).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = source(ids, attention_mask=mask, position_ids=pos).logits
        out = converted(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5), (out[real] - ref[real]).abs().max()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = source.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(converted.generate(ids, attention_mask=mask, **kw), expected)
    return converted


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_qwen2_with_sliding_window_and_tokenizer(tmp_path, impl):
    torch.manual_seed(0)
    cfg = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    source = Qwen2ForCausalLM(cfg).eval()
    src = save_source(source, tmp_path / "qwen2")
    tok = tiny_tokenizer(src)
    config = convert_llm(src, tmp_path / "arlow")
    assert config.attention_bias and not config.use_qk_norm
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    converted = assert_same_logits(source, tmp_path / "arlow", impl)
    assert converted.model.layers[0].self_attn.q_proj.bias is not None
    assert converted.model.layers[0].self_attn.o_proj.bias is None
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "arlow")
    assert reloaded("w5 w9 w14")["input_ids"] == tok("w5 w9 w14")["input_ids"] == [5, 9, 14]
    assert (tmp_path / "arlow" / "generation_config.json").is_file()


def test_llama_sharded_tied_llama3_rope(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    source = LlamaForCausalLM(cfg).eval()
    src = save_source(source, tmp_path / "llama", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    config = convert_llm(src, tmp_path / "arlow")
    assert config.tie_word_embeddings and config.head_dim == 16 and config.rope_parameters["rope_type"] == "llama3"
    index = json.loads((tmp_path / "arlow" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and "model.embed_tokens.weight" in index["weight_map"]
    converted = assert_same_logits(source, tmp_path / "arlow")
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "arlow")) is ArlowForCausalLM


def test_qwen3_qk_norm_maps_to_use_qk_norm(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=2,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                       "original_max_position_embeddings": 32})
    source = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so the test sees whether q_norm/k_norm are applied
        for layer in source.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    src = save_source(source, tmp_path / "qwen3")
    config = convert_llm(src, tmp_path / "arlow")
    assert config.use_qk_norm and not config.attention_bias
    converted = assert_same_logits(source, tmp_path / "arlow", "eager")
    assert converted.model.layers[1].self_attn.q_norm.weight.shape == (16,)


def _llama_dir(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "num_hidden_layers": 1, **overrides})
    return save_source(LlamaForCausalLM(cfg), tmp_path / "src")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention_bias": True}, "o_proj"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
    ],
)
def test_unsupported_architecture_is_refused(tmp_path, overrides, message):
    src = _llama_dir(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        convert_llm(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_unknown_model_type_weights_and_destination_are_refused(tmp_path):
    src = _llama_dir(tmp_path)
    raw = json.loads((src / "config.json").read_text())
    other = tmp_path / "mistral"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**raw, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        convert_llm(other, tmp_path / "x")

    weights = load_file(src / "model.safetensors")
    save_file({**weights, "model.layers.0.self_attn.sinks": torch.zeros(4)}, src / "model.safetensors")
    with pytest.raises(ValueError, match="sinks"):
        convert_llm(src, tmp_path / "y")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors")
    with pytest.raises(ValueError, match="up_proj"):
        convert_llm(src, tmp_path / "z")
    assert not any(p.name.startswith((".x", ".y", ".z", "x", "y", "z")) for p in tmp_path.iterdir())

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_llm(src, tmp_path / "full")


def test_cli_main(tmp_path, capsys):
    src = _llama_dir(tmp_path)
    assert main([str(src), str(tmp_path / "out")]) == 0
    assert "1 layers" in capsys.readouterr().out
    assert ArlowTextConfig.from_pretrained(tmp_path / "out").num_hidden_layers == 1
    assert main([str(src), str(tmp_path / "out"), "--overwrite"]) == 0
