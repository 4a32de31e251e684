"""Linear probe of frozen features, as in MAE's linprobe: ``BatchNorm1d`` without affine parameters (a parameter-free
whitening per feature) followed by one ``Linear`` layer, trained with cross-entropy.

Training is deterministic for a seed: the head's initial weights and the mini-batch order come from a private
``torch.Generator`` (the global RNG is neither read nor changed). The optimiser is SGD with momentum 0.9 and a
cosine learning-rate schedule, no weight decay (MAE uses LARS with zero decay; on a few thousand features plain
SGD reaches the same optimum).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearProbeConfig", "LinearProbe", "train_linear_probe", "probe_accuracy"]


@dataclass
class LinearProbeConfig:
    """Settings of :func:`train_linear_probe`.

    Args:
        epochs: passes over the training features.
        batch_size: features per SGD step (capped at the number of training items).
        learning_rate: peak lr of the cosine schedule (MAE: base lr 0.1 per 256 samples).
        momentum, weight_decay: SGD settings.
        seed: seeds the head's init and the mini-batch order.
    """

    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"linear probe epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"linear probe batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"linear probe learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}")


class LinearProbe(nn.Module):
    """``(n, D)`` features -> ``(n, num_classes)`` logits through ``BatchNorm1d(affine=False)`` and ``Linear``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(features))


@contextmanager
def _one_thread():
    """Run the probe's tiny matrix products on one thread: on a busy CPU the synchronisation of a thread pool costs
    far more than a ``(256, D) @ (D, classes)`` product (measured ~10x slower with 2 threads on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       config: LinearProbeConfig | None = None) -> LinearProbe:
    """Fit a :class:`LinearProbe` on ``features (n, D)`` / ``labels (n,)``; returns it in eval mode."""
    config = config or LinearProbeConfig()
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (n, D) with labels (n,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"a linear probe needs at least 2 training items, got {features.shape[0]}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes})")
    with _one_thread():
        return _train(features, labels, num_classes, config)


def _train(features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: LinearProbeConfig) -> LinearProbe:
    generator = torch.Generator().manual_seed(config.seed)
    x, y = features.float(), labels.long()
    n = x.shape[0]
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init would draw from the global RNG
        probe = LinearProbe(x.shape[1], num_classes)
    with torch.no_grad():  # MAE's head init: small weights, zero bias
        probe.head.weight.copy_(torch.randn(probe.head.weight.shape, generator=generator) * 0.01)
        probe.head.bias.zero_()
    optimizer = torch.optim.SGD(probe.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    batch = min(config.batch_size, n)
    # drop a last batch of one item: BatchNorm cannot take statistics over a single sample
    steps_per_epoch = n // batch + (1 if n % batch > 1 else 0)
    total = config.epochs * steps_per_epoch
    step = 0
    probe.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            if idx.numel() < 2:
                continue
            for group in optimizer.param_groups:  # cosine decay to zero, per step
                group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of a trained probe."""
    if features.shape[0] == 0 or labels.shape != (features.shape[0],):
        raise ValueError("need at least one item and one label per item")
    return float((probe.eval()(features.float()).argmax(dim=1) == labels.long()).float().mean())
