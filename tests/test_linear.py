"""Tests of the oneDNN inference path of ``arlow.modeling.kernels.linear``: it gives ``F.linear`` + activation's numbers,
runs only where it should (checked with a spy on the oneDNN op), and leaves training, wrapped layers and the
models' outputs as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from arlow import ArlowTextConfig, ArlowTextModel, ArlowVisionConfig, ArlowVLVisionModel
from arlow.modeling.kernels import linear as lin
from arlow.modeling.kernels.linear import Linear, linear, linear_then, onednn_supports, pack_weights, set_onednn_linear

pytestmark = pytest.mark.skipif(not onednn_supports(torch.float32), reason="this PyTorch build has no oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Count the calls that reach the oneDNN op (the path is on for the test, whatever the environment says)."""
    calls = []
    real = lin._ONEDNN_OP

    def spy(*args):
        calls.append(args[3])  # the fused post-op's name
        return real(*args)

    monkeypatch.setattr(lin, "_ONEDNN_OP", spy)
    previous = set_onednn_linear(True)
    yield calls
    set_onednn_linear(previous)


FUSED = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu", "silu": "swish", "relu": "relu"}


@pytest.mark.parametrize("act_name", [None, "gelu", "gelu_pytorch_tanh", "silu", "relu", "quick_gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_equals_f_linear(onednn_calls, act_name, with_bias):
    torch.manual_seed(0)
    x, weight = torch.randn(3, 37, 48), torch.randn(80, 48) * 0.2
    bias = torch.randn(80) if with_bias else None
    act = None if act_name is None else ACT2FN[act_name]
    with torch.no_grad():
        expected = F.linear(x, weight, bias)
        expected = expected if act is None else act(expected)
        got = linear(x, weight, bias, act)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Fusable activations run inside the one oneDNN call; quick GELU (no oneDNN post-op) after it.
    assert onednn_calls == [FUSED.get(act_name, "none")]


def test_exact_and_tanh_gelu_are_told_apart(onednn_calls):
    x, weight = torch.linspace(-4, 4, 64).view(8, 8), torch.eye(8)
    with torch.no_grad():
        exact, tanh = linear(x, weight, None, nn.GELU()), linear(x, weight, None, nn.GELU(approximate="tanh"))
    torch.testing.assert_close(exact, F.gelu(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(tanh, F.gelu(x, approximate="tanh"), rtol=0, atol=1e-6)
    assert (exact - tanh).abs().max() > 1e-4  # the two formulas differ by ~3e-4 here: the test can tell


@pytest.mark.skipif(not onednn_supports(torch.bfloat16), reason="no oneDNN bf16 kernels on this CPU")
def test_onednn_bf16(onednn_calls):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(64, 96), torch.randn(128, 96) * 0.1, torch.randn(128)
    with torch.no_grad():
        got = linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), ACT2FN["gelu_pytorch_tanh"])
    expected = F.gelu(F.linear(x.bfloat16().float(), weight.bfloat16().float(), bias.bfloat16().float()),
                      approximate="tanh")
    assert got.dtype == torch.bfloat16 and onednn_calls == ["gelu"]
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_training_autocast_and_other_dtypes_take_f_linear(onednn_calls):
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    reference = nn.Linear(16, 8)
    reference.load_state_dict(layer.state_dict())

    out = layer(x, activation=nn.SiLU())  # autograd records: F.linear, gradients as nn.Linear's
    F.silu(reference(x)).sum().backward()
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert layer(x).dtype == torch.bfloat16  # autocast's own casting, as for nn.Linear
    with torch.no_grad():
        layer.half()(x.half())
    assert onednn_calls == []

    with torch.no_grad():
        layer.float()(x)
    assert onednn_calls == ["none"]
    set_onednn_linear(False)
    with torch.no_grad():
        layer(x)
    assert onednn_calls == ["none"]


def test_inputs_without_grad_use_onednn_even_with_grad_mode_on(onednn_calls):
    layer = Linear(16, 8).requires_grad_(False)
    layer(torch.randn(2, 16))
    assert onednn_calls == ["none"]


class _Wrapped(nn.Module):
    """Stands for a PEFT LoRA wrapper: adds its own term to the base layer's output."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base

    def forward(self, x, *args, **kwargs):
        return self.base_layer(x, *args, **kwargs) + 1.0


def test_linear_then_applies_the_activation_after_a_wrapper(onednn_calls):
    base = Linear(8, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        fused = linear_then(base, x, nn.ReLU())
        wrapped = linear_then(_Wrapped(base), x, nn.ReLU())
        torch.testing.assert_close(fused, F.relu(F.linear(x, base.weight, base.bias)))
        torch.testing.assert_close(wrapped, F.relu(F.linear(x, base.weight, base.bias) + 1.0))
    assert onednn_calls == ["relu", "none"]


def test_state_dict_is_nn_linear_s():
    layer = Linear(4, 3)
    assert isinstance(layer, nn.Linear) and list(layer.state_dict()) == ["weight", "bias"]
    nn.Linear(4, 3).load_state_dict(layer.state_dict())


def _outputs_with_and_without(model, run):
    with torch.inference_mode():
        set_onednn_linear(False)
        plain = run(model)
        set_onednn_linear(True)
        fast = run(model)
    return plain, fast


def test_vision_encoder_same_outputs_with_onednn(onednn_calls):
    torch.manual_seed(0)
    config = ArlowVisionConfig(depth=2, embed_dim=32, hidden_size=24, num_heads=2, patch_size=2, temporal_patch_size=2,
                               spatial_merge_size=2, deepstack_visual_indexes=[0], use_progressive_patches=True)
    model = ArlowVLVisionModel(config).eval()
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), config.patch_dim)
    plain, fast = _outputs_with_and_without(model, lambda m: m(pixels, grid))
    torch.testing.assert_close(fast.last_hidden_state, plain.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.deepstack_features[0], plain.deepstack_features[0], rtol=1e-5, atol=1e-5)
    # patch embedding, 2 x (qkv, proj, fc1 + GELU, fc2), progressive projection, 2 mergers x 2
    assert onednn_calls.count("gelu") == 4 and len(onednn_calls) == 14


def test_text_model_same_outputs_with_onednn(onednn_calls):
    torch.manual_seed(0)
    config = ArlowTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = ArlowTextModel(config).eval()
    ids = torch.randint(1, 64, (2, 9))
    plain, fast = _outputs_with_and_without(model, lambda m: m(ids).last_hidden_state)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert onednn_calls.count("swish") == 2 and len(onednn_calls) == 2 * 7  # q, k, v, o, gate + SiLU, up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_same_outputs_and_follow_weight_changes(onednn_calls, dtype):
    if not onednn_supports(dtype):
        pytest.skip("no oneDNN kernels for this dtype here")
    torch.manual_seed(0)
    layer = Linear(64, 96).to(dtype)
    x = torch.randn(5, 64).to(dtype)
    with torch.no_grad():
        plain = layer(x, activation=nn.GELU())
        assert pack_weights(layer) == 1
        packed = layer(x, activation=nn.GELU())
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        stored = lin._PACKS[layer][1]
        assert layer(x) is not None and lin._PACKS[layer][1] is stored  # packed once, reused

        layer.weight.mul_(2)  # an in-place change (an optimiser step): the pack is refreshed, never stale
        doubled = layer(x)
        torch.testing.assert_close(doubled, F.linear(x, layer.weight, layer.bias), rtol=1e-2, atol=1e-2)
        assert lin._PACKS[layer][1] is not stored
        layer.load_state_dict({"weight": torch.zeros(96, 64).to(dtype), "bias": torch.zeros(96).to(dtype)})
        assert torch.count_nonzero(layer(x)) == 0

        assert pack_weights(layer, enabled=False) == 1 and layer not in lin._PACKS
    assert set(onednn_calls) == {"gelu", "none"}


def test_pack_weights_counts_the_model_s_layers():
    config = ArlowTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    assert pack_weights(ArlowTextModel(config)) == 2 * 7


def test_the_documented_packing_example_runs():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cpu-inference.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "pack_weights(model)" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/cpu-inference.md", "exec"), namespace)
    assert namespace["out"].shape == (1, 24)
    assert all(layer in lin._PACKS for layer in namespace["model"].modules() if type(layer) is Linear)
    pack_weights(namespace["model"], enabled=False)
