"""Fine-tuning evaluation (MAE's main protocol): the whole encoder and a linear head trained end to end.

``FinetuneConfig.last_blocks = k`` runs MAE's *partial* fine-tuning instead: the stem (the modules that run before
the first block: ``patch_embed``, ``pos_embed``, ``progressive_proj``; ``embeddings`` in transformers' ViT family)
and every block but the last ``k`` stay frozen; the last ``k`` blocks, whatever runs after them (mergers, final
norm) and the head train. ``k = 0`` trains only what follows the blocks.

``finetune_accuracy`` copies the encoder (the caller's model is left untouched), puts a ``LayerNorm`` + ``Linear``
head (MAE's ``fc_norm`` + ``head`` of global-pool fine-tuning) on its pooled feature (:func:`arlow.evaluation.features.pooled_features`, or any ``features_fn``), trains both with AdamW,
cross-entropy with label smoothing, a linear warm-up and a per-step cosine decay, random translations of a few
pixels, and scores top-1 on the test images. Every random choice (head init, batch order, augmentation) comes from
one private generator seeded with ``config.seed``, so a pretrained encoder and its random initialisation get
exactly the same budget, batches and augmentation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import pooled_features

__all__ = ["FinetuneConfig", "finetune_accuracy", "freeze_all_but_last_blocks", "random_shift"]

# Top-level modules that run before the first block (Arlow's vision encoder; transformers' ViT family).
_STEM = ("patch_embed", "pos_embed", "progressive_proj", "embeddings")


@dataclass
class FinetuneConfig:
    """A short schedule (minutes on a CPU for a few thousand small images)."""

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 5e-4  # peak AdamW lr of the encoder and the head
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    shift: int = 2  # augmentation: random translation by up to this many pixels (0: none)
    seed: int = 0
    last_blocks: int | None = None  # None: the whole encoder trains; k: partial fine-tuning of the last k blocks


def _blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's transformer blocks: Arlow's ``blocks``, or transformers' ViT family's (``layers`` from 5.2x,
    ``encoder.layer`` before)."""
    for path in ("blocks", "layers", "encoder.layer", "encoder.layers"):
        try:
            blocks = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"partial fine-tuning needs an encoder with `blocks`, `layers` or `encoder.layer`, got "
                     f"{type(encoder).__name__}; use last_blocks=None to fine-tune the whole encoder")


def freeze_all_but_last_blocks(encoder: nn.Module, last_blocks: int) -> list[str]:
    """Freeze ``encoder``'s stem and all blocks but the last ``last_blocks`` (in place); returns the frozen names."""
    blocks = _blocks(encoder)
    if not 0 <= last_blocks <= len(blocks):
        raise ValueError(f"last_blocks must lie in [0, {len(blocks)}] (the encoder's depth), got {last_blocks}")
    frozen_ids = {id(p) for block in blocks[:len(blocks) - last_blocks] for p in block.parameters()}
    frozen_ids |= {id(p) for name, child in encoder.named_children() if name in _STEM for p in child.parameters()}
    frozen = []
    for name, parameter in encoder.named_parameters():
        if id(parameter) in frozen_ids:
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``(n, C, H, W)`` by up to ``shift`` pixels (edge pixels repeated)."""
    if shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    index = (rows * padded.shape[-1] + cols).reshape(n, 1, -1).expand(-1, c, -1).to(x.device)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def finetune_accuracy(encoder: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                      test_y: torch.Tensor, num_classes: int, config: FinetuneConfig | None = None,
                      features_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Fine-tune a copy of ``encoder`` + a linear head on ``train_x (n, 3, R, R)`` (normalised pixels) /
    ``train_y (n,)``; returns ``{"top1", "train_top1", "trainable_parameters", "seconds", "config"}`` (test top-1 on
    ``test_x``/``test_y``; the trained parameters counted with the head's).

    ``features_fn(encoder, pixels) -> (B, D)`` pools the encoder's output (default: Arlow's default probe feature).
    """
    config = config or FinetuneConfig()
    features_fn = features_fn or pooled_features
    if train_x.dim() != 4 or train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError(f"need images (n, C, H, W) with labels (n,), got {tuple(train_x.shape)} / "
                         f"{tuple(train_y.shape)} and {tuple(test_x.shape)} / {tuple(test_y.shape)}")
    if int(train_y.min()) < 0 or int(train_y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes})")
    started = time.time()
    model = copy.deepcopy(encoder)
    if config.last_blocks is not None:
        freeze_all_but_last_blocks(model, config.last_blocks)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    model.eval()
    with torch.no_grad():
        dim = features_fn(model, train_x[:2].to(device)).shape[1]
    # MAE's fc_norm: the pooled feature's scale is whatever pretraining left, the head sees it normalised
    head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)).to(device)
    with torch.no_grad():  # MAE's head init: small weights, zero bias
        head[1].weight.copy_(torch.randn(head[1].weight.shape, generator=generator) * 0.01)
        head[1].bias.zero_()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    n = train_x.shape[0]
    batch = min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    total = config.epochs * steps_per_epoch
    warmup = max(1, int(config.warmup_fraction * total))
    step = 0
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            lr = config.learning_rate * (step + 1) / warmup if step < warmup else \
                config.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = random_shift(train_x[idx], config.shift, generator).to(device)
            logits = head(features_fn(model, x))
            loss = F.cross_entropy(logits, train_y[idx].to(device), label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
    model.eval()

    @torch.no_grad()
    def accuracy(x, y):
        hits = 0
        for start in range(0, x.shape[0], 256):
            logits = head(features_fn(model, x[start:start + 256].to(device)))
            hits += int((logits.argmax(dim=1).cpu() == y[start:start + 256]).sum())
        return hits / x.shape[0]

    return {"top1": accuracy(test_x, test_y), "train_top1": accuracy(train_x, train_y),
            "trainable_parameters": sum(p.numel() for p in params), "seconds": round(time.time() - started, 2),
            "config": asdict(config)}
