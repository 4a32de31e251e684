"""train.compile and train.activation_checkpointing: same numbers as the plain model (CPU, inductor)."""

import copy
import os

import pytest
import torch

from arlow import ArlowVLVisionModel
from arlow.pretrain.mae import ArlowMAEForPreTraining
from arlow.processing.patches import patchify
from arlow.training import TrainConfig, Trainer
from arlow.training.switches import compile_blocks, enable_activation_checkpointing

def pack(sizes=((56, 56), (56, 84), (56, 56)), frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, grids = zip(*(patchify(torch.rand(frames, 3, h, w, generator=g), 14, 2, 2) for h, w in sizes))
    return torch.cat(rows), torch.stack(grids)


def test_whole_encoder_compiles_with_one_break_outside_the_blocks(tiny_config):
    """The input checks and packing plan are left to eager (compiler.disable); blocks, rope and merger trace."""
    model = ArlowVLVisionModel(tiny_config("encoder")).eval()
    rows, grid = pack()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(rows, grid)
    assert explained.graph_break_count <= 1, [str(b.reason)[:80] for b in explained.break_reasons]
    torch._dynamo.reset()


@pytest.mark.slow  # ~60 s on 2 busy cores: inductor generates and builds C++ for a block's forward
def test_compiled_blocks_give_the_same_outputs(tiny_config):
    torch.manual_seed(0)
    eager = ArlowVLVisionModel(tiny_config("encoder")).eval()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    assert compile_blocks(compiled) == 2  # inductor, what train.compile uses
    rows, grid = pack()
    with torch.no_grad():
        want, got = eager(rows, grid), compiled(rows, grid)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.deepstack_features[0], want.deepstack_features[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_blocks_give_the_same_gradients(tiny_config):
    """The traced graphs (forward and the autograd graph AOT builds from it) compute what eager does; the
    "aot_eager" backend runs them without code generation, so this stays fast."""
    torch.manual_seed(0)
    eager = ArlowVLVisionModel(tiny_config("encoder"))
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    assert compile_blocks(compiled, backend="aot_eager") == 2
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    rows, grid = pack()
    outs = []
    for model in (eager, compiled):
        out = model(rows, grid)
        loss = out.last_hidden_state.pow(2).mean() + out.deepstack_features[0].pow(2).mean()
        loss.backward()
        outs.append((out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_compile_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="_no_split_modules"):
        compile_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="supports_gradient_checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


class _Batches:
    def __init__(self, n):
        self.batches = []
        for i in range(n):
            rows, grid = pack(seed=i)
            self.batches.append({"pixel_values": rows, "grid_thw": grid})
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batches[(self.position - 1) % len(self.batches)]


def test_activation_checkpointing_trains_the_mae_to_the_same_weights(tiny_config, tmp_path):
    """Recomputing block activations in backward changes memory, not numbers (fp32, 2 steps)."""
    # the "encoder" tiny config as the MAE's encoder (the MAE kind's other encoder fields are the defaults)
    config = tiny_config("mae", vision=dict(depth=2, hidden_size=32, deepstack_visual_indexes=[0]),
                         decoder_num_layers=1)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ArlowMAEForPreTraining(config)
        cfg = TrainConfig(output_dir=str(tmp_path / str(ckpt)), max_steps=2, save_every=0, progress_bar=False,
                          tensorboard=False, activation_checkpointing=ckpt, seed=0)
        trainer = Trainer(cfg, model, _Batches(2))
        assert model.encoder.blocks[0].gradient_checkpointing == ckpt
        trainer.train()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    plain, checkpointed = results
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6, msg=name)
