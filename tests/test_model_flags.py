"""Every capability flag an Arlow model class sets, proven by running what the flag promises (tiny configs, CPU).

transformers reads these flags to decide what it may do with a model: ``_can_compile_fullgraph`` makes ``generate``
compile the forward when a static cache is used, ``_supports_attention_backend`` lets callers (vLLM's Transformers
backend, TGI) route attention through functions registered with ``AttentionInterface``, ``_supports_sdpa`` /
``_supports_flash_attn`` allow those implementations, ``supports_gradient_checkpointing`` the checkpointing switch.
A flag no test here proves must be dropped from the class. The table below lists the claims; a class that sets a
flag not listed fails ``test_every_claimed_flag_is_listed``.
"""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config
from transformers.generation.configuration_utils import CompileConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from arlow.modeling.multimodal import ArlowForConditionalGeneration, ArlowModel
from arlow.modeling.text import (
    ArlowForCausalLM,
    ArlowForQuestionAnswering,
    ArlowForSequenceClassification,
    ArlowForTokenClassification,
    ArlowTextModel,
)
from arlow.modeling.vision import ArlowVLVisionModel

TEXT_CLASSES = (ArlowTextModel, ArlowForCausalLM, ArlowForSequenceClassification, ArlowForTokenClassification,
                ArlowForQuestionAnswering)
VLM_CLASSES = (ArlowModel, ArlowForConditionalGeneration)
FLAGS = ("_can_compile_fullgraph", "_supports_attention_backend", "_supports_sdpa", "_supports_flash_attn",
         "_supports_flex_attn", "supports_gradient_checkpointing")
# class -> the flags it claims, each proven below (test name in the comment)
CLAIMS = {
    **{cls: {"_can_compile_fullgraph",  # test_text_generate_compiles_fullgraph
             "_supports_attention_backend",  # test_registered_attention_backend_runs_the_text_decoder
             "_supports_sdpa",  # test_text.py::test_attention_implementation_switch_and_flash_flag (+ conformance)
             "_supports_flash_attn",  # test_flash_style_backend_runs_the_text_decoder
             "supports_gradient_checkpointing"}  # test_text.py::test_gradient_checkpointing_recomputes_and_...
       for cls in TEXT_CLASSES},
    **{cls: {"_can_compile_fullgraph",  # test_vlm_generate_compiles_fullgraph
             "_supports_attention_backend",  # test_registered_attention_backend_runs_both_towers
             "_supports_sdpa",  # conformance: test_eager_matches_sdpa_inference_*
             "_supports_flash_attn",  # test_flash_style_backend_runs_the_text_decoder; test_vision.py flash path
             "supports_gradient_checkpointing"}  # test_vlm_gradient_checkpointing_recomputes_both_towers
       for cls in VLM_CLASSES},
    ArlowVLVisionModel: {"_supports_sdpa",  # test_vision.py: sdpa vs eager
                         "_supports_flash_attn",  # test_vision.py::test_flash_path_is_one_varlen_call_per_layer
                         "supports_gradient_checkpointing"},  # test_vision.py::test_gradient_checkpointing_...
}


def test_every_claimed_flag_is_listed():
    for cls, claimed in CLAIMS.items():
        assert {flag for flag in FLAGS if getattr(cls, flag)} == claimed, cls.__name__


# ----------------------------------------------------------------------------------------------------------------
# _can_compile_fullgraph: generate() compiles the decode step with fullgraph=True (any graph break raises)


def _compiled_generate(model, inputs: dict, steps: int = 4):
    """Greedy ``generate`` with a static cache: once eager, once through transformers' auto-compile with
    ``fullgraph=True`` (the "eager" dynamo backend: the whole graph is captured, no C++ compiler needed)."""
    torch._dynamo.reset()
    common = dict(max_new_tokens=steps, do_sample=False, cache_implementation="static", output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        eager = model.generate(**inputs, **common, disable_compile=True)
        config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        compiled = model.generate(**inputs, **common, compile_config=config)
    assert hasattr(model, "_compiled_call"), "generate did not compile the forward"
    return eager, compiled


def _assert_same_generation(eager, compiled):
    assert torch.equal(eager.sequences, compiled.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)


def test_text_generate_compiles_fullgraph():
    torch.manual_seed(0)
    model = ArlowForCausalLM(tiny_config("text")).eval()
    ids = torch.randint(1, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    eager, compiled = _compiled_generate(model, {"input_ids": ids, "attention_mask": mask})
    _assert_same_generation(eager, compiled)


def test_vlm_generate_compiles_fullgraph():
    """The prefill encodes the image (run eagerly by generate); every decode step is the compiled graph."""
    torch.manual_seed(0)
    config = tiny_config("vlm", image_token_id=8188, video_token_id=8189, vision_start_token_id=8190,
                         vision_end_token_id=8191)
    model = ArlowForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 8190] + [8188] * 4 + [8191, 9, 10], [11, 8190] + [8188] * 4 + [8191, 12, 13]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(32, config.vision_config.patch_dim),
              "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])}
    eager, compiled = _compiled_generate(model, inputs)
    _assert_same_generation(eager, compiled)


# ----------------------------------------------------------------------------------------------------------------
# _supports_attention_backend: a function registered with AttentionInterface runs the model's attention


@contextmanager
def registered_attention(name, function, mask_like):
    """``name`` registered as an attention backend running ``function``, with the ``mask_like`` backend's masks;
    unregistered on exit."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


@pytest.fixture
def recording_backend():
    """``"arlow_recording"``: transformers' SDPA function, recording each call's module and keyword arguments."""
    calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((type(module).__name__, sorted(kwargs)))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    with registered_attention("arlow_recording", recording, mask_like="sdpa"):
        yield calls


def test_registered_attention_backend_runs_the_text_decoder(recording_backend):
    torch.manual_seed(0)
    model = ArlowForCausalLM(tiny_config("text")).eval()
    ids = torch.randint(1, 101, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("arlow_recording")  # refused for a class without the flag
        got = model(ids, attention_mask=mask, arlow_probe=1).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(recording_backend) == model.config.num_hidden_layers
    # transformers' keyword arguments reach the registered function (padding-free training passes cu_seq_lens so)
    assert all(name == "ArlowAttention" and "arlow_probe" in kw for name, kw in recording_backend)


def test_registered_attention_backend_runs_both_towers(recording_backend):
    torch.manual_seed(0)
    config = tiny_config("vlm", image_token_id=8188, video_token_id=8189, vision_start_token_id=8190,
                         vision_end_token_id=8191)
    model = ArlowForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 8190] + [8188] * 4 + [8191, 9, 10]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(16, config.vision_config.patch_dim),
              "image_grid_thw": torch.tensor([[1, 4, 4]])}
    with torch.no_grad():
        want = model(**inputs).logits
        model.set_attn_implementation("arlow_recording")
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    modules = [name for name, _ in recording_backend]
    assert modules.count("ArlowVLAttention") == config.vision_config.depth
    assert modules.count("ArlowAttention") == config.text_config.num_hidden_layers


# ----------------------------------------------------------------------------------------------------------------
# _supports_flash_attn: what the decoder hands a flash kernel (a 2-D padding mask or none, un-expanded GQA heads,
# the sliding window as an argument) is enough to compute its attention. flash-attn itself needs CUDA; the
# stand-in below computes what the kernel computes from exactly those arguments.


@pytest.fixture
def flash_reference():
    calls = []

    def flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
        # flash kernels take (B, H, S, D) here and attend causally with key/value heads shared by query groups
        assert attention_mask is None or attention_mask.ndim == 2, "a flash kernel gets a 2-D padding mask at most"
        calls.append((attention_mask is not None, sliding_window, key.shape[1]))
        b, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
        q_pos = torch.arange(k_len - q_len, k_len)[:, None]
        k_pos = torch.arange(k_len)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= q_pos - k_pos < sliding_window
        allowed = allowed[None, None].expand(b, 1, q_len, k_len)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -k_len:].bool()
        scores = (query @ key.transpose(-1, -2)) * scaling
        weights = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        return (weights @ value).transpose(1, 2).contiguous(), None

    with registered_attention("flash_reference", flash, mask_like="flash_attention_2"):
        yield calls


def test_flash_style_backend_runs_the_text_decoder(flash_reference):
    """Left-padded batch over full and sliding-window layers: the flash path gives the sdpa logits at every real
    position (padded rows are garbage under any kernel)."""
    torch.manual_seed(0)
    config = tiny_config("text")
    model = ArlowForCausalLM(config).eval()
    ids = torch.randint(1, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        # set_attn_implementation would import a flash package for a name containing "flash"; the config field is
        # what the attention layers and the mask builder read.
        model.config._attn_implementation = "flash_reference"
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    windows = [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    assert flash_reference == [(True, w, config.num_key_value_heads) for w in windows]


# ----------------------------------------------------------------------------------------------------------------
# supports_gradient_checkpointing (VLM): both towers recompute in backward, the gradients do not change


def test_vlm_gradient_checkpointing_recomputes_both_towers():
    torch.manual_seed(0)
    config = tiny_config("vlm", image_token_id=8188, video_token_id=8189, vision_start_token_id=8190,
                         vision_end_token_id=8191)
    model = ArlowForConditionalGeneration(config).train()
    ids = torch.tensor([[5, 8190] + [8188] * 4 + [8191, 9, 10]])
    inputs = {"input_ids": ids, "labels": ids, "pixel_values": torch.randn(16, config.vision_config.patch_dim),
              "image_grid_thw": torch.tensor([[1, 4, 4]])}

    def run():
        model.zero_grad()
        calls = []
        # on a submodule: the checkpointed layer's own hooks run once, its insides again in backward
        hooks = [model.model.visual.blocks[1].fc1.register_forward_pre_hook(lambda *a: calls.append("vision")),
                 model.model.language_model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append("text"))]
        model(**inputs).loss.backward()
        for hook in hooks:
            hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sorted(calls)

    plain, plain_calls = run()
    model.activation_checkpointing_enable()  # gradient_checkpointing_enable on transformers < 5.20 (arlow._compat)
    ckpt, ckpt_calls = run()
    assert plain_calls == ["text", "vision"] and ckpt_calls == ["text", "text", "vision", "vision"]
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)
