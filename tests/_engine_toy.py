"""A tiny model and a resumable, rank-sharded toy dataset for the training-engine tests.

Imported by tests/test_engine*.py, and run as a script by them (under torchrun / accelerate launch / a plain
subprocess) the way users run training::

    python tests/_engine_toy.py CONFIG.yaml train.max_steps=20 toy.delay=0.05

CONFIG.yaml has a ``train:`` section (a TrainConfig) and a ``toy:`` section (ToySpec). At the end the main
process writes ``output_dir/final.safetensors`` (the trained weights) and ``output_dir/summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn


@dataclasses.dataclass
class ToySpec:
    d_in: int = 8
    hidden: int = 16
    batch: int = 4  # samples per micro-batch
    batches_per_epoch: int = 12  # global micro-batches in one epoch (all ranks together)
    dropout: float = 0.0
    data_seed: int = 1234
    model_seed: int = 0
    poison: list[int] = dataclasses.field(default_factory=list)  # global micro-batch ordinals whose loss is NaN
    delay: float = 0.0  # seconds slept per micro-batch (lets a test kill the run mid-way)
    unreadable: list[int] = dataclasses.field(default_factory=list)  # global ordinals whose reading raises OSError


class ToyModel(nn.Module):
    """Linear -> LayerNorm -> GELU -> dropout -> Linear regression; MSE loss. Has 2-D weights and 1-D biases/norms."""

    _no_split_modules = ["Linear"]  # what FSDP's TRANSFORMER_BASED_WRAP (configs/accelerate/fsdp.yaml) shards

    def __init__(self, d_in: int = 8, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x, y, poison=None):
        pred = self.fc2(self.drop(nn.functional.gelu(self.norm(self.fc1(x))))).squeeze(-1)
        loss = ((pred - y) ** 2).mean()
        if poison is not None and bool(poison > 0):  # not torch.where: its backward would leak NaN into clean steps
            loss = loss * float("nan")
        return {"loss": loss, "pred": pred}


def toy_batch(index: int, spec: ToySpec, batch: int | None = None) -> dict[str, torch.Tensor]:
    """Global micro-batch ``index`` of the toy regression task (a pure function of (data_seed, index))."""
    b = spec.batch if batch is None else batch
    g = torch.Generator().manual_seed(spec.data_seed * 100_003 + index)
    x = torch.randn(b, spec.d_in, generator=g)
    w = torch.linspace(-1.0, 1.0, spec.d_in)
    y = torch.sin(x @ w) + 0.1 * torch.randn(b, generator=g)
    return {"x": x, "y": y}


class ToyData:
    """Micro-batches in a per-epoch shuffled order, rank ``r`` of ``world`` taking every ``world``-th one, so two
    processes see exactly the micro-batches one process sees as two accumulation steps. Resumable by position."""

    def __init__(self, spec: ToySpec, rank: int = 0, world: int = 1):
        if spec.batches_per_epoch % world:
            raise ValueError("batches_per_epoch must be a multiple of the world size")
        self.spec, self.rank, self.world = spec, rank, world
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already yielded on this rank
        self.local_len = spec.batches_per_epoch // world

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def global_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.spec.data_seed + epoch)
        perm = torch.randperm(self.spec.batches_per_epoch, generator=g)
        return (perm + epoch * self.spec.batches_per_epoch).tolist()

    def __iter__(self):
        order = self.global_order(self.epoch)
        while self.position < self.local_len:
            i = self.position
            index = order[i * self.world + self.rank]
            ordinal = (self.epoch * self.local_len + i) * self.world + self.rank
            self.position += 1  # before yielding: state_dict() then names the next micro-batch
            if ordinal in self.spec.unreadable:
                raise OSError(f"micro-batch {ordinal} cannot be read (simulated data error on rank {self.rank})")
            batch = toy_batch(index, self.spec)
            batch["poison"] = torch.tensor(1.0 if ordinal in self.spec.poison else 0.0)
            batch["num_samples"] = self.spec.batch
            batch["num_tokens"] = self.spec.batch * self.spec.d_in
            if self.spec.delay:
                time.sleep(self.spec.delay)
            yield batch
        self.epoch += 1
        self.position = 0


def build_model(spec: ToySpec) -> ToyModel:
    torch.manual_seed(spec.model_seed)
    return ToyModel(spec.d_in, spec.hidden, spec.dropout)


def toy_flops(spec: ToySpec):
    """flops_per_batch for ToyModel: 3 x forward of the two linear layers (norm/activation ignored)."""
    from arlow.modeling.flops import linear_flops
    from arlow.training.mfu import train_flops

    def flops(batch):
        n = batch["x"].shape[0]
        return train_flops(linear_flops(n, spec.d_in, spec.hidden) + linear_flops(n, spec.hidden, 1))

    return flops


def main(argv: list[str]) -> None:
    from arlow.training import TrainConfig, Trainer, apply_overrides, load_yaml, rank_and_world

    if os.environ.get("ARLOW_TOY_NO_SHM", "1") == "1":
        _skip_deepspeed_shm_build()
    tree = apply_overrides(load_yaml(argv[0]), argv[1:])
    cfg = TrainConfig.from_dict(tree.get("train", {}))
    spec = ToySpec(**tree.get("toy", {}))
    rank, world = rank_and_world()
    model = build_model(spec)
    trainer = Trainer(cfg, model, ToyData(spec, rank, world), flops_per_batch=toy_flops(spec))
    summary = trainer.train()
    acc = trainer.accelerator
    Path(cfg.output_dir, f"params_{acc.process_index}.json").write_text(json.dumps(_param_sizes(trainer.model)))
    weights = acc.get_state_dict(trainer.model)
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.float().contiguous() for k, v in weights.items()}, str(Path(cfg.output_dir) / "final.safetensors"))
        Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary))
    acc.wait_for_everyone()
    acc.end_training()


def _param_sizes(model: nn.Module) -> dict:
    """Elements of every parameter held by this process, and its full size (FSDP2 shards are DTensors)."""
    from torch.distributed.tensor import DTensor

    return {name: [(p.to_local() if isinstance(p, DTensor) else p).numel(), p.numel()]
            for name, p in model.named_parameters()}


def _skip_deepspeed_shm_build() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use (~60-120 s on a 2-core
    # machine). Collectives then go through torch.distributed (gloo) instead, which is all 2 toy processes need.
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
