"""Masked autoencoding over merge windows: the model of Arlow's vision pretraining (design D6).

``ArlowMAEForPreTraining`` = ``ArlowVLVisionModel`` (the encoder that is exported) + a light decoder.

* The encoder runs on the visible merge windows only (``patch_positions`` keep their places in the full grid),
  so progressive pooling, the merger and the locality bias see whole windows.
* The decoder works at window resolution: each window token is ``decoder_embed(merged encoder token)`` plus one
  projection per DeepStack level (so every exported parameter, DeepStack mergers included, receives gradient);
  masked windows get a shared ``mask_token``. 3-D rotary positions (t, h / s, w / s) tell windows apart.
  ``decoder_pred`` maps each window token to its ``s**2`` patch rows (``C * Tp * P * P`` values each).
* Target: the patch rows, normalised per patch (``norm_pix_loss``, mean/var over the patch's values, as MAE);
  loss: per-patch MSE averaged over the patches of masked windows only.

Shapes, with ``n`` items, ``N`` packed patch rows and ``M = sum_i t_i * W_i`` windows:
``pixel_values (N, C*Tp*P*P)``, ``grid_thw (n, 3)``, ``pred (M, s**2, C*Tp*P*P)``, ``mask (M,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .._compat import ActivationCheckpointingCompat, build_sub_configs, declare_sub_configs
from ..configuration import ArlowVisionConfig, default_mrope_sections
from ..modeling.devices import to_device
from ..modeling.flops import linear_flops, transformer_block_flops
from ..modeling.rope import apply_rotary, mrope_slot_axes, multi_axis_angles, rope_inv_freq, vision_patch_positions
from ..modeling.vision import ArlowVLVisionModel, vision_forward_flops
from ..training.mfu import train_flops
from .masking import WindowMask, num_visible_windows, sample_window_mask, window_positions

__all__ = ["ArlowMAEConfig", "ArlowMAEForPreTraining", "MAEOutput", "mae_train_flops", "normalize_patches"]


@declare_sub_configs
@strict(accept_kwargs=True)
class ArlowMAEConfig(PreTrainedConfig):
    r"""MAE pretraining wrapper config: the encoder's ``vision_config`` plus the decoder and the objective.

    Args:
        vision_config: the encoder (``ArlowVisionConfig`` or dict); ``None`` -> the published encoder.
        decoder_hidden_size, decoder_num_layers, decoder_num_heads: the decoder (card: 512 / 8 / 8; the original
            MAE used 16 heads at width 512).
        decoder_mlp_ratio: decoder MLP width multiple.
        mask_ratio: fraction of merge windows hidden per temporal slice (0.75).
        norm_pix_loss: regress per-patch normalised pixels (MAE's best setting).
        decoder_rope_theta: rotary base of the decoder's 3-D window positions.
        decoder_deepstack_dropout: in training, the probability that a visible window token reads only its final
            merged token, without the DeepStack levels' ``decoder_deepstack_embed[k](level_k)`` (the kept ones are
            scaled by ``1 / (1 - p)``, so evaluation reads every level). 0 always reads them; 1 never does (the
            DeepStack mergers then get no gradient from pretraining).
    """

    model_type = "arlow_mae"
    sub_configs_defaults = {"vision_config": ArlowVisionConfig}

    vision_config: dict | PreTrainedConfig | None = None
    decoder_hidden_size: int = 512
    decoder_num_layers: int = 8
    decoder_num_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_rope_theta: float = 10000.0
    decoder_deepstack_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type") == "arlow":
            self.vision_config = {**self.vision_config, "model_type": "arlow_vision"}
        build_sub_configs(self)
        super().__post_init__(**kwargs)
        if self.decoder_hidden_size % self.decoder_num_heads or (self.decoder_hidden_size // self.decoder_num_heads) % 2:
            raise ValueError(f"decoder_hidden_size ({self.decoder_hidden_size}) / decoder_num_heads "
                             f"({self.decoder_num_heads}) must be an even integer (rotary head dim)")
        if self.decoder_num_layers < 1:
            raise ValueError("decoder_num_layers must be >= 1")
        if not 0.0 <= self.decoder_deepstack_dropout <= 1.0:
            raise ValueError(f"decoder_deepstack_dropout must be in [0, 1], got {self.decoder_deepstack_dropout}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")


def normalize_patches(rows: torch.Tensor, eps: float = 1e-6):
    """Per-row normalisation ``(x - mean) / sqrt(var + eps)`` over the last axis; returns (normed, mean, std)."""
    mean = rows.mean(dim=-1, keepdim=True)
    var = rows.var(dim=-1, keepdim=True, unbiased=True)
    std = (var + eps).sqrt()
    return (rows - mean) / std, mean, std


@dataclass
class MAEOutput(ModelOutput):
    """``loss`` scalar; ``pred (M, s**2, C*Tp*P*P)`` in target space; ``mask (M,)`` True = masked window;
    ``window_counts (n,)`` windows per item."""

    loss: torch.Tensor | None = None
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    window_counts: torch.Tensor | None = None


class MAEDecoderBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block with 3-D rotary attention over one item's windows at a time."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x (B, L, dim)`` — a group of items with the same number of windows; ``cos/sin (B, L, head_dim)``."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rotary(q, cos[:, None], sin[:, None])
        k = apply_rotary(k, cos[:, None], sin[:, None])
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ArlowMAEForPreTraining(ActivationCheckpointingCompat, PreTrainedModel):
    """The MAE model. ``encoder`` is a plain ``ArlowVLVisionModel``; export it with ``export_encoder``."""

    config_class = ArlowMAEConfig
    main_input_name = "pixel_values"
    base_model_prefix = "mae"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["ArlowVLBlock", "MAEDecoderBlock"]
    # Inputs the training engine leaves on the host: the masking, positions and packing layout are planned from
    # the grids on the CPU, and reading them back from a GPU would stall it every forward.
    host_input_names = ("grid_thw",)

    def __init__(self, config: ArlowMAEConfig):
        super().__init__(config)
        vc = config.vision_config
        d = config.decoder_hidden_size
        self.encoder = ArlowVLVisionModel(vc)
        self.decoder_embed = nn.Linear(vc.hidden_size, d)
        self.decoder_deepstack_embed = nn.ModuleList(nn.Linear(vc.hidden_size, d)
                                                     for _ in vc.deepstack_visual_indexes)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.decoder_blocks = nn.ModuleList(MAEDecoderBlock(d, config.decoder_num_heads, config.decoder_mlp_ratio)
                                            for _ in range(config.decoder_num_layers))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, vc.spatial_merge_size**2 * vc.patch_dim)
        head_dim = d // config.decoder_num_heads
        self.register_buffer("decoder_slot_axes", mrope_slot_axes(default_mrope_sections(head_dim)), persistent=False)
        self.post_init()

    def _init_weights(self, module):
        if module is self:
            init.normal_(self.mask_token, std=self.config.initializer_range)
            head_dim = self.config.decoder_hidden_size // self.config.decoder_num_heads
            init.copy_(self.decoder_slot_axes, mrope_slot_axes(default_mrope_sections(head_dim)))
        elif isinstance(module, nn.Linear) and not self._is_encoder_module(module):
            init.xavier_uniform_(module.weight)  # MAE's decoder init
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and not self._is_encoder_module(module):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _is_encoder_module(self, module) -> bool:
        return any(module is m for m in self.encoder.modules())

    # ----------------------------------------------------------------------------------------------------------
    def mask(self, grid_thw: torch.Tensor, noise: torch.Tensor | None = None, mask_ratio: float | None = None,
             generator: torch.Generator | None = None) -> WindowMask:
        """Sample which windows the encoder sees (see :func:`arlow.pretrain.masking.sample_window_mask`)."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        return sample_window_mask(grid_thw.cpu(), self.config.vision_config.spatial_merge_size, ratio, noise,
                                  generator)

    def forward_encoder(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, mask: WindowMask):
        """Encode the visible windows. Returns merged tokens ``(n_visible_windows, hidden)`` and DeepStack list."""
        s = self.config.vision_config.spatial_merge_size
        grid_thw = grid_thw.cpu()
        # positions and lengths stay on the host, where the encoder checks them; only the row index travels
        positions = vision_patch_positions(grid_thw, s)[mask.visible_rows]
        rows = to_device(mask.visible_rows, pixel_values.device)
        out = self.encoder(pixel_values=pixel_values[rows], grid_thw=grid_thw, patch_positions=positions,
                           seq_lengths=mask.visible_lengths)
        return out.last_hidden_state, list(out.deepstack_features or ())

    def forward_decoder(self, latent: torch.Tensor, deepstack: list[torch.Tensor], grid_thw: torch.Tensor,
                        mask: WindowMask) -> torch.Tensor:
        """Window tokens -> predicted patch rows ``(M, s**2, C*Tp*P*P)``."""
        vis = self.decoder_embed(latent)
        drop = self.config.decoder_deepstack_dropout if self.training else 0.0
        if deepstack and drop < 1.0:
            shortcut = sum(proj(level) for proj, level in zip(self.decoder_deepstack_embed, deepstack))
            if drop > 0.0:  # the final merged token alone must describe a dropped window
                keep = torch.rand(shortcut.shape[0], 1, device=shortcut.device) >= drop
                shortcut = shortcut * keep.to(shortcut.dtype) / (1.0 - drop)
            vis = vis + shortcut
        # index tensors made on the host: a boolean-mask write on the device would sync to count its rows
        visible = to_device((~mask.masked).nonzero().squeeze(1), latent.device)
        tokens = self.mask_token.to(vis.dtype).expand(mask.masked.numel(), -1).clone()
        tokens[visible] = vis
        cos, sin = self.decoder_rotary(grid_thw)
        # Items with the same number of windows attend in one batched call; no cross-item mask is needed.
        counts = mask.window_counts.tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        out = torch.empty_like(tokens)
        for length in sorted(set(counts)):
            idx = [i for i, c in enumerate(counts) if c == length]
            sel = to_device(torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx]), latent.device)
            x = tokens[sel].view(len(idx), length, -1)
            c_, s_ = cos[sel].view(len(idx), length, -1), sin[sel].view(len(idx), length, -1)
            for block in self.decoder_blocks:
                x = block(x, c_, s_)
            out[sel] = x.reshape(-1, x.shape[-1])
        vc = self.config.vision_config
        return self.decoder_pred(self.decoder_norm(out)).view(-1, vc.spatial_merge_size**2, vc.patch_dim)

    def decoder_rotary(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` each ``(M, decoder_head_dim)`` float32: every window's 3-D rotary table, items concatenated.

        The inverse frequencies are built from the config on the model's device at each call, not kept in a
        buffer: a module cast (``model.to(torch.bfloat16)``, DeepSpeed's bf16/fp16 engines) would round a
        floating-point buffer (3.7e-3 relative in bf16) and every decoder rotation with it.
        """
        device = self.mask_token.device
        head_dim = self.config.decoder_hidden_size // self.config.decoder_num_heads
        pos = to_device(window_positions(grid_thw.cpu(), self.config.vision_config.spatial_merge_size), device)
        inv_freq = rope_inv_freq(head_dim, self.config.decoder_rope_theta, device=device)
        angles = multi_axis_angles(pos, inv_freq, self.decoder_slot_axes)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()

    def forward_loss(self, pixel_values: torch.Tensor, pred: torch.Tensor, mask: WindowMask) -> torch.Tensor:
        """Per-patch MSE over the patches of masked windows (fp32)."""
        s2 = self.config.vision_config.spatial_merge_size**2
        target = pixel_values.float().view(-1, s2, pixel_values.shape[-1])
        if self.config.norm_pix_loss:
            target = normalize_patches(target)[0]
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (M, s2)
        return per_patch[to_device(mask.masked.nonzero().squeeze(1), pred.device)].mean()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, noise: torch.Tensor | None = None,
                mask_ratio: float | None = None, **unused) -> MAEOutput:
        """Mask, encode visible windows, decode all windows, score the masked ones.

        Args:
            pixel_values: ``(N, C*Tp*P*P)`` packed patch rows (the data pipeline's batch format).
            grid_thw: ``(n, 3)``.
            noise: optional ``(sum_i W_i,)`` masking scores (deterministic tests).
            mask_ratio: override of ``config.mask_ratio`` for this call.
        """
        vc = self.config.vision_config
        if pixel_values.dim() != 2 or pixel_values.shape[-1] != vc.patch_dim:
            raise ValueError(f"pixel_values must be (N_patches, {vc.patch_dim}), got {tuple(pixel_values.shape)}")
        mask = self.mask(grid_thw, noise, mask_ratio)
        latent, deepstack = self.forward_encoder(pixel_values, grid_thw, mask)
        pred = self.forward_decoder(latent, deepstack, grid_thw, mask)
        loss = self.forward_loss(pixel_values, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask.masked, window_counts=mask.window_counts)


def mae_train_flops(config: ArlowMAEConfig, grid_thw: torch.Tensor, mask_ratio: float | None = None) -> float:
    """Model FLOPs of one training step (:func:`arlow.training.mfu.train_flops` of the forward) on the items of
    ``grid_thw``: the encoder on each item's visible windows (:func:`~arlow.modeling.vision.vision_forward_flops`),
    then the decoder on all windows (projection of the encoder's and DeepStack outputs, blocks, pixel head)."""
    vc = config.vision_config
    ratio = config.mask_ratio if mask_ratio is None else mask_ratio
    s2 = vc.spatial_merge_size**2
    d = config.decoder_hidden_size
    levels = len(vc.deepstack_visual_indexes)
    visible, windows = [], []
    for t, h, w in grid_thw.tolist():
        per_slice = (h // vc.spatial_merge_size) * (w // vc.spatial_merge_size)
        visible.append(t * num_visible_windows(per_slice, ratio))
        windows.append(t * per_slice)
    forward = vision_forward_flops(vc, [n * s2 for n in visible])
    forward += (1 + levels) * linear_flops(sum(visible), vc.hidden_size, d)
    forward += config.decoder_num_layers * transformer_block_flops(windows, d, int(d * config.decoder_mlp_ratio))
    forward += linear_flops(sum(windows), d, s2 * vc.patch_dim)
    return train_flops(forward)
