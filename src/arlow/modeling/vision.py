"""The Arlow vision encoder: a native-resolution ViT over packed images and videos.

Read top to bottom: the locality bias and the packed-attention layout (pure helpers), then the modules (patch
embedding, rotary angles, attention, block, merger), then ``ArlowVLVisionModel``, which checks its input and wires
the modules together.

Input (design D3): ``pixel_values (N, C*Tp*P*P)`` flattened patch rows of several items (images or videos)
concatenated, each item's rows in merge-window-major order (the ``s*s`` patches of a merge window are
contiguous, see :func:`arlow.processing.patches.patchify`), plus ``grid_thw (n_items, 3)`` in patch units.
Output: ``t*h*w / s**2`` merged tokens of width ``hidden_size`` per item, items concatenated in order.

Parameter names and shapes follow the reference fork (``patch_embed.proj``, ``blocks.{i}.attn.qkv`` ...) so its
tensors load by name; the numerics do not reproduce its defects: RoPE is a true rotation over (t, h, w), heads
are merged transpose-then-reshape, every item keeps all its tokens, many items run in one call, and the locality
bias is an additive mask that works with SDPA.

Packing (design D4): attention is confined to each item. Under flash attention (or a kernel of
:mod:`arlow.modeling.kernels` that takes the whole pack) one varlen call covers the whole pack. Otherwise items of
equal length run as one batched call ``(n_same, H, L, D)``; the encoder reorders items once so that such groups are
contiguous and restores the caller's order at the end. Device-specific kernels live in :mod:`arlow.modeling.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import is_flash_attention_requested

from .._compat import ActivationCheckpointingCompat
from ..configuration import ArlowConfig, ArlowVisionConfig
from . import kernels
from .devices import to_device
from .flops import linear_flops, transformer_block_flops
from .kernels.linear import Linear, linear, linear_then
from .rope import (
    cu_seqlens_from_lengths,
    mrope_slot_axes,
    multi_axis_angles,
    rope_inv_freq,
    rotate_pairs,
    vision_patch_positions,
)

__all__ = [
    "ArlowPreTrainedModel",
    "ArlowVLVisionModel",
    "ArlowVisionModelOutput",
    "locality_bias",
    "normalized_coordinates",
    "vision_forward_flops",
    "rotate_pairs",
]

@dataclass
class ArlowVisionModelOutput(ModelOutput):
    """Output of :class:`ArlowVLVisionModel`.

    Args:
        last_hidden_state: ``(N / s**2, hidden_size)`` merged tokens, items concatenated in input order.
        deepstack_features: one ``(N / s**2, hidden_size)`` tensor per entry of
            ``config.deepstack_visual_indexes`` (empty tuple when there are none).
        hidden_states: with ``output_hidden_states=True``, ``depth + 1`` un-merged states ``(N, embed_dim)``: the
            patch embeddings entering block 0, then the output of every block.
        unmerged_state: ``(N, embed_dim)`` output of the last block, before the merger, rows in input order.
    """

    last_hidden_state: torch.Tensor | None = None
    deepstack_features: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    unmerged_state: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: locality bias


def normalized_coordinates(positions: torch.Tensor, extents: torch.Tensor) -> torch.Tensor:
    """Map integer (t, h, w) patch positions into ``[0, 1]`` per axis of each row's item.

    Args:
        positions: ``(N, 3)`` integer positions.
        extents: ``(N, 3)`` full grid ``(t, h, w)`` of the item each row belongs to.
    Returns:
        ``(N, 3)`` float32, ``position / (extent - 1)``; an axis of extent 1 maps to 0.
    """
    span = (extents - 1).clamp(min=1).float()
    return positions.float() / span


def interpolated_position_weights(positions: torch.Tensor, extents: torch.Tensor,
                                  side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear read-out of a ``side x side`` table of absolute position embeddings at each patch's (h, w).

    The table spans every item edge to edge, whatever its grid (Qwen3-VL's interpolated ``pos_embed``): row ``h`` of
    an item ``H`` patches high sits at table coordinate ``h * (side - 1) / (H - 1)`` (``0`` when ``H = 1``), likewise
    for ``w``; time is ignored, so every frame of a clip gets the same embedding at the same place.

    Args:
        positions: ``(N, 3)`` integer (t, h, w) positions.
        extents: ``(N, 3)`` full grid ``(t, h, w)`` of the item each row belongs to.
        side: the table is ``side * side`` rows, row-major over (h, w).
    Returns:
        ``index (N, 4)`` long table rows and ``weight (N, 4)`` float32 bilinear weights summing to 1 per row.
    """
    coords = normalized_coordinates(positions, extents)[:, 1:] * (side - 1)  # (N, 2) in table units
    low = coords.floor().clamp(max=side - 1)
    high = (low + 1).clamp(max=side - 1)
    frac = coords - low
    (h0, w0), (h1, w1) = low.long().unbind(1), high.long().unbind(1)
    fh, fw = frac.unbind(1)
    index = torch.stack([h0 * side + w0, h0 * side + w1, h1 * side + w0, h1 * side + w1], dim=1)
    weight = torch.stack([(1 - fh) * (1 - fw), (1 - fh) * fw, fh * (1 - fw), fh * fw], dim=1)
    return index, weight


def sincos_position_table(side: int, dim: int) -> torch.Tensor:
    """``(side * side, dim)`` 2-D sine-cosine position embeddings (MAE's fixed table), row-major over (h, w).

    The first half of the channels encodes h, the second half w; each half is ``sin`` then ``cos`` of the position
    at ``dim / 4`` frequencies ``10000 ** (-k / (dim / 4))``. It initialises the learned table, so position is
    present in every token from the first step instead of hiding under random noise of the size of the weights'
    init. ``dim`` must be a multiple of 4.
    """
    quarter = dim // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    axis = torch.arange(side, dtype=torch.float64)[:, None] * freqs  # (side, quarter)
    per_axis = torch.cat([axis.sin(), axis.cos()], dim=1)  # (side, dim/2)
    h = per_axis[:, None, :].expand(side, side, -1)
    w = per_axis[None, :, :].expand(side, side, -1)
    return torch.cat([h, w], dim=-1).reshape(side * side, dim).float()


def locality_bias(coords: torch.Tensor, strength: float, window: float) -> torch.Tensor:
    """Parameter-free additive attention bias that favours nearby patches (the fork's "deformable attention").

    ``bias_ij = -strength * d_ij``, minus another ``100 * strength`` when ``window > 0`` and ``d_ij > window``,
    with ``d_ij`` the Euclidean distance of normalised coordinates.

    Args:
        coords: ``(..., L, 3)`` normalised coordinates (:func:`normalized_coordinates`) of one item per leading index.
    Returns:
        ``(..., L, L)`` float32 bias.
    """
    # The exact (non-matmul) distance keeps d_ii == 0; the matmul trick leaves ~1e-4 noise after the sqrt.
    dist = torch.cdist(coords.float(), coords.float(), compute_mode="donot_use_mm_for_euclid_dist")
    beyond = dist > window if window > 0 else None
    bias = dist.mul_(-strength)
    if beyond is not None:
        bias.sub_(beyond.to(bias.dtype), alpha=100.0 * strength)
    return bias


# ----------------------------------------------------------------------------------------------------------------
# The packed-attention layout: how the rows of a pack are split into attention calls


def temporal_slice_lengths(t_positions: torch.Tensor, lengths: list[int]) -> list[int]:
    """Rows of each (item, temporal slice) run, in row order: the attention units of ``video_attention="frame"``.

    Args:
        t_positions: ``(N,)`` temporal coordinate of every row.
        lengths: rows per item (summing to ``N``).
    Returns:
        One length per temporal slice of every item (an image is one slice).
    Raises:
        ValueError: an item's rows are not grouped by temporal slice (a slice's rows must be contiguous).
    """
    item = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(t_positions.device)
    key = item * (int(t_positions.max()) + 1) + t_positions
    runs, counts = torch.unique_consecutive(key, return_counts=True)
    if runs.numel() != torch.unique(key).numel():
        raise ValueError(
            "video_attention='frame' needs each item's rows grouped by temporal slice (all rows of t=0, then t=1, "
            "...), as the processors and the MAE masking produce them; got a temporal slice split into several runs"
        )
    return counts.tolist()


@dataclass
class _Segment:
    """``count`` items of ``length`` rows each, contiguous from row ``start``, attended in one batched call."""

    start: int
    count: int
    length: int
    mask: torch.Tensor | None  # additive float mask (count, 1, length, length), or None for plain attention

    @property
    def stop(self) -> int:
        return self.start + self.count * self.length


@dataclass
class _PackedLayout:
    """Everything the attention layers need to keep each item to itself; built once per forward.

    ``order`` (row permutation, or ``None`` for identity) reorders the pack so that every segment is a contiguous
    slice; ``restore`` undoes it on the rows, ``token_restore`` on the merged tokens.
    """

    segments: list[_Segment] | None  # None: the whole pack in one varlen call (cu_seqlens, max_length, coords)
    cu_seqlens: torch.Tensor  # (n_items + 1,) int32, in processing order
    max_length: int
    order: torch.Tensor | None = None
    restore: torch.Tensor | None = None
    token_restore: torch.Tensor | None = None
    coords: torch.Tensor | None = None  # (N, 3) normalised coordinates for a whole-pack kernel's locality bias


def _build_layout(lengths: list[int], coords: torch.Tensor | None, config: ArlowVisionConfig,
                  dtype: torch.dtype, device: torch.device, merge_rows: int, whole_pack: bool) -> _PackedLayout:
    """Plan the attention calls for items of ``lengths`` rows.

    Args:
        lengths: rows per attention unit (an item, or one temporal slice of it under ``video_attention="frame"``),
            in input order.
        coords: ``(N, 3)`` normalised coordinates (input order) when the locality bias is on, else ``None``.
        dtype: dtype of the attention scores (masks are cast to it).
        merge_rows: ``s**2``, rows per merged token.
        whole_pack: one varlen call over the whole pack (flash attention, whole-pack kernels) instead of one
            batched call per group of equal-length items.
    """
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    total = starts[-1]

    def cu(ls):
        return to_device(cu_seqlens_from_lengths(torch.tensor(ls, dtype=torch.long)), device)

    if whole_pack:
        return _PackedLayout(None, cu(lengths), max(lengths), coords=coords)

    def bias_for(rows: slice, count: int, length: int):
        if coords is None:
            return None
        return locality_bias(coords[rows].view(count, length, 3), config.deformable_attention_strength,
                             config.deformable_attention_window).unsqueeze(1).to(dtype)

    # Group items of equal length, groups in order of first appearance, items in input order inside a group.
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    processing = [i for members in groups.values() for i in members]
    order = restore = token_restore = None
    if processing != list(range(len(lengths))):
        order = to_device(torch.cat([torch.arange(starts[i], starts[i + 1]) for i in processing]), device)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(total, device=order.device)
        # Items move as wholes and every length is a multiple of s*s, so tokens move with their first row.
        token_restore = torch.div(order[::merge_rows], merge_rows, rounding_mode="floor")
        token_restore = torch.argsort(token_restore)
        if coords is not None:
            coords = coords[order]
    segments, start = [], 0
    for length, members in groups.items():
        count = len(members)
        rows = slice(start, start + count * length)
        segments.append(_Segment(start, count, length, bias_for(rows, count, length)))
        start = rows.stop
    return _PackedLayout(segments, cu([lengths[i] for i in processing]), max(lengths), order, restore, token_restore)


# ----------------------------------------------------------------------------------------------------------------
# Modules


class ArlowVisionPatchEmbed(nn.Module):
    """Linear embedding of flattened patch rows: ``(N, C*Tp*P*P) -> (N, E)``.

    The weight is a bias-free ``Conv3d`` with kernel = stride = ``(Tp, P, P)`` (the fork's key and shape). On a row
    that already holds exactly one kernel's worth of pixels ordered ``(C, Tp, P, P)`` that convolution is a single
    matrix product, which is what runs.
    """

    def __init__(self, config: ArlowVisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))


class ArlowVisionPositionTable(nn.Embedding):
    """The learned ``S x S`` absolute position table (``num_position_embeddings = S * S`` rows of ``embed_dim``),
    initialised with :func:`sincos_position_table` times ``init_scale`` (``config.position_embedding_scale``); read
    out by :meth:`ArlowVLVisionModel._absolute_positions`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim)
        self.init_scale = init_scale  # kept on the module: an outer model's _init_weights has another config


class ArlowVisionRotaryEmbedding(nn.Module):
    """Angles of the 3-D (t, h, w) rotary embedding for given patch positions.

    Frequency slots are dealt round-robin to the axes according to ``config.mrope_sections``
    (:func:`arlow.modeling.rope.mrope_slot_axes`); ``theta = config.rope_theta``. The frequencies are recomputed
    in fp32 on every call (``D/2`` numbers) rather than kept in a buffer: ``model.to(torch.bfloat16)`` would round
    a buffer to 3 significant digits (angle errors up to ~0.4 rad at position 100), and a non-persistent buffer
    comes back empty from a meta-device ``from_pretrained``.
    """

    def __init__(self, config: ArlowVisionConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.sections = list(config.mrope_sections)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions (N, 3)`` integer (t, h, w) -> ``cos, sin`` each ``(N, D/2)`` float32, one per frequency slot
        (the half-split table of :func:`arlow.modeling.rope.apply_rotary` is ``cat([cos, cos], -1)``)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, device=positions.device)
        angles = multi_axis_angles(positions, inv_freq, mrope_slot_axes(self.sections))
        return angles.cos(), angles.sin()


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain softmax attention. q/k/v ``(B, H, L, D)``, mask additive ``(B, 1|H, L, L)``.

    Returns ``(out (B, L, H, D), weights (B, H, L, L))``; softmax in fp32 for bf16 stability.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ArlowVLAttention(nn.Module):
    """Multi-head self-attention over a packed sequence with 3-D RoPE, confined to each item.

    ``qkv`` is one fused Linear whose output rows are Q, then K, then V, each head-major ``[H][D]``.
    """

    def __init__(self, config: ArlowVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by the SDPA integration: without it, mask-free calls would run causal
        self.num_key_value_groups = 1
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: _PackedLayout) -> torch.Tensor:
        """``x (N, E)``, ``cos/sin (N, D/2)`` -> ``(N, E)``."""
        n_rows, width = x.shape
        qkv = self.qkv(x).view(n_rows, 3, self.num_heads, self.head_dim)
        qk = rotate_pairs(qkv[:, :2], cos[:, None, None, :], sin[:, None, None, :])  # (N, 2, H, D)
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if layout.segments is None:  # the whole pack in one varlen call
            cu, longest = layout.cu_seqlens, layout.max_length
            extra = {} if layout.coords is None else {"locality_coords": layout.coords}
            out, _ = attention(
                self, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attention_mask=None, scaling=self.scaling, dropout=0.0, is_causal=False,
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest, **extra,
            )
            return self.proj(out.reshape(n_rows, width))
        outs = []
        for seg in layout.segments:  # one batched call per group of equal-length items
            rows = slice(seg.start, seg.stop)

            def heads_first(t):
                return t[rows].view(seg.count, seg.length, self.num_heads, self.head_dim).transpose(1, 2)

            out, _ = attention(self, heads_first(q), heads_first(k), heads_first(v), attention_mask=seg.mask,
                               scaling=self.scaling, dropout=0.0, is_causal=False)
            outs.append(out.reshape(seg.count * seg.length, width))  # (n, L, H, D): tokens first, heads merged
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class ArlowVLBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + fc2(act(fc1(norm2(x))))``."""

    def __init__(self, config: ArlowVisionConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = ArlowVLAttention(config)
        self.fc1 = Linear(config.embed_dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: _PackedLayout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.fc2(linear_then(self.fc1, self.norm2(x), self.act))


class ArlowVLPatchMerger(nn.Module):
    """``(N, E) -> (N / s**2, hidden_size)``: concatenate each merge window's ``s*s`` consecutive rows, then
    LayerNorm over the merged vector and a two-layer MLP with exact GELU."""

    def __init__(self, config: ArlowVisionConfig):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(self.merged_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            Linear(self.merged_dim, config.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, act, fc2 = self.mlp
        return fc2(linear_then(fc1, self.ln_q(x.reshape(-1, self.merged_dim)), act))


# ----------------------------------------------------------------------------------------------------------------
# Models


class ArlowPreTrainedModel(ActivationCheckpointingCompat, PreTrainedModel):
    """Shared base of the Arlow vision models: attention back-ends, checkpointing and weight init."""

    config_class = ArlowConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArlowVLBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ArlowVisionPositionTable):
            table = sincos_position_table(math.isqrt(module.num_embeddings), module.embedding_dim)
            init.copy_(module.weight, table * module.init_scale)
        else:
            super()._init_weights(module)


class ArlowVLVisionModel(ArlowPreTrainedModel):
    """Native-resolution ViT over packed images and videos, with optional locality bias, progressive patches and
    DeepStack taps. See the module docstring for the input format and ``forward`` for shapes.
    """

    config_class = ArlowVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image", "video")
    _no_split_modules = ["ArlowVLBlock"]

    def __init__(self, config: ArlowVisionConfig):
        super().__init__(config)
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = ArlowVisionPatchEmbed(config)
        self.rotary_pos_emb = ArlowVisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList(ArlowVLBlock(config) for _ in range(config.depth))
        self.merger = ArlowVLPatchMerger(config)
        if config.num_position_embeddings:
            self.pos_embed = ArlowVisionPositionTable(config.num_position_embeddings, config.embed_dim,
                                                      config.position_embedding_scale)
        if config.use_progressive_patches:
            self.progressive_proj = Linear(config.embed_dim, config.embed_dim)
        if config.deepstack_visual_indexes:
            self.deepstack_mergers = nn.ModuleList(
                ArlowVLPatchMerger(config) for _ in config.deepstack_visual_indexes
            )
        self.gradient_checkpointing = False
        self.post_init()

    def get_dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (patch rows -> ``embed_dim``), as transformers' vision encoders return theirs."""
        return self.patch_embed

    # -- input checks -------------------------------------------------------------------------------------------

    @torch.compiler.disable
    def _check_inputs(self, pixel_values, grid_thw, patch_positions, seq_lengths):
        """Validate the packed input; return ``(grid (n, 3) long, positions (N, 3) long, lengths list[int])``."""
        cfg, s = self.config, self.spatial_merge_size
        width = cfg.patch_dim
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be flattened patch rows of shape (N_patches, C*Tp*P*P) = (N, {width}), got "
                f"{shape}. Turn frames into rows with arlow.processing.patches.patchify or the Arlow image processor."
            )
        if pixel_values.shape[1] != width:
            raise ValueError(
                f"pixel_values rows have {pixel_values.shape[1]} values but this encoder expects C*Tp*P*P = "
                f"{cfg.in_channels}*{cfg.temporal_patch_size}*{cfg.patch_size}*{cfg.patch_size} = {width}"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is empty (0 patch rows); pass at least one image or video")
        if not isinstance(grid_thw, torch.Tensor):
            grid_thw = torch.as_tensor(grid_thw)
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise ValueError(f"grid_thw must have shape (n_items, 3) with n_items >= 1, got {tuple(grid_thw.shape)}")
        if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool or grid_thw.is_complex():
            raise ValueError(f"grid_thw must hold integers (t, h, w) in patch units, got dtype {grid_thw.dtype}")
        grid = grid_thw.long().cpu()
        if (grid < 1).any():
            raise ValueError(f"every grid_thw entry must be >= 1, got {grid.tolist()}")
        if ((grid[:, 1:] % s) != 0).any():
            raise ValueError(
                f"grid h and w must be multiples of spatial_merge_size={s} (merge windows are {s}x{s} patches), "
                f"got {grid.tolist()}; resize images to multiples of patch_size*{s} = {cfg.patch_size * s} pixels"
            )
        full = grid.prod(dim=1)
        n_rows = pixel_values.shape[0]
        if patch_positions is None:
            if int(full.sum()) != n_rows:
                raise ValueError(
                    f"grid_thw {grid.tolist()} describes {int(full.sum())} patches (sum of t*h*w) but pixel_values "
                    f"has {n_rows} rows. For a subset of patches (masked autoencoding) pass patch_positions and "
                    "seq_lengths."
                )
            if seq_lengths is not None and torch.as_tensor(seq_lengths).cpu().long().tolist() != full.tolist():
                raise ValueError(
                    f"seq_lengths {torch.as_tensor(seq_lengths).tolist()} must equal t*h*w per item "
                    f"{full.tolist()} when patch_positions is not given"
                )
            positions = vision_patch_positions(grid, s)
            return grid, positions, full.tolist()
        positions = self._check_subset(grid, n_rows, patch_positions, seq_lengths)
        return grid, positions, torch.as_tensor(seq_lengths).cpu().long().tolist()

    def _check_subset(self, grid, n_rows, patch_positions, seq_lengths) -> torch.Tensor:
        s = self.spatial_merge_size
        window = s * s
        if seq_lengths is None:
            raise ValueError("patch_positions needs seq_lengths (n_items,): how many of the rows belong to each item")
        lengths = torch.as_tensor(seq_lengths).cpu()
        if lengths.dim() != 1 or lengths.shape[0] != grid.shape[0] or lengths.dtype.is_floating_point:
            raise ValueError(
                f"seq_lengths must be an integer tensor of shape (n_items,) = ({grid.shape[0]},), got shape "
                f"{tuple(lengths.shape)} dtype {lengths.dtype}"
            )
        lengths = lengths.long()
        if int(lengths.sum()) != n_rows:
            raise ValueError(f"seq_lengths {lengths.tolist()} sum to {int(lengths.sum())} but pixel_values has "
                             f"{n_rows} rows")
        if (lengths < window).any() or (lengths % window).any():
            raise ValueError(
                f"every seq_lengths entry must be a positive multiple of spatial_merge_size**2 = {window} (whole "
                f"merge windows, at least one per item), got {lengths.tolist()}"
            )
        if (lengths > grid.prod(dim=1)).any():
            raise ValueError(f"seq_lengths {lengths.tolist()} exceed the patches of grid_thw {grid.tolist()}")
        positions = patch_positions if isinstance(patch_positions, torch.Tensor) else torch.as_tensor(patch_positions)
        if positions.shape != (n_rows, 3) or positions.dtype.is_floating_point:
            raise ValueError(
                f"patch_positions must be an integer tensor (N_patches, 3) = ({n_rows}, 3) of (t, h, w) patch "
                f"coordinates, got shape {tuple(positions.shape)} dtype {positions.dtype}"
            )
        positions = positions.long().cpu()
        extents = torch.repeat_interleave(grid, lengths, dim=0)
        if (positions < 0).any() or (positions >= extents).any():
            raise ValueError("patch_positions lie outside their item's grid_thw: need 0 <= (t, h, w) < grid per item")
        win = positions.view(-1, window, 3)
        first = win[:, :1]
        within = (win[..., 1] % s) * s + win[..., 2] % s
        same_window = (win[..., 0] == first[..., 0]) & (win[..., 1] // s == first[..., 1] // s) \
            & (win[..., 2] // s == first[..., 2] // s)
        if not same_window.all() or not (within == torch.arange(window)).all():
            raise ValueError(
                f"patch_positions must list whole {s}x{s} merge windows: each run of {window} consecutive rows is "
                "one window's patches in (dh, dw) row-major order, as patchify produces"
            )
        # A window listed twice would be attended twice and merged into two tokens.
        wgrid = extents[::window].clone()
        wgrid[:, 1:] //= s
        key = (first[:, 0, 0] * wgrid[:, 1] + first[:, 0, 1] // s) * wgrid[:, 2] + first[:, 0, 2] // s
        item = torch.repeat_interleave(torch.arange(grid.shape[0]), lengths // window)
        key = key + item * int(grid.prod(dim=1).max())
        if torch.unique(key).numel() != key.numel():
            raise ValueError("patch_positions lists the same merge window more than once within an item")
        return positions

    @torch.compiler.disable
    def _plan(self, grid: torch.Tensor, positions: torch.Tensor, lengths: list[int], dtype: torch.dtype,
              device: torch.device) -> tuple[_PackedLayout, torch.Tensor, torch.Tensor]:
        """Host-side planning of one forward: the attention layout (masks, ``cu_seqlens``, item order) and the
        rotary tables ``cos, sin (N, D/2)`` in processing order. Python over item lengths, so ``torch.compile``
        leaves it out (as it does :meth:`_check_inputs`) and compiles the blocks as whole graphs."""
        cfg = self.config
        positions = to_device(positions, device)  # checked on the host; the copy does not stall it
        coords = None
        if cfg.use_deformable_attention:
            extents = to_device(torch.repeat_interleave(grid, torch.tensor(lengths), dim=0), device)
            coords = normalized_coordinates(positions, extents)
        units = lengths  # rows that attend to each other
        if cfg.video_attention == "frame" and bool((grid[:, 0] > 1).any()):
            units = temporal_slice_lengths(positions[:, 0], lengths)
        flash = is_flash_attention_requested(cfg)
        if flash and coords is not None:
            raise ValueError(
                "use_deformable_attention=True adds a per-pair score bias that flash attention cannot take. Use "
                "attn_implementation='arlow_flex' for the vision encoder (packing and the bias in one fused "
                "flex_attention kernel; e.g. attn_implementation={'vision_config': 'arlow_flex', 'text_config': "
                "'flash_attention_2'} for the VLM), 'sdpa', or turn the bias off."
            )
        layout = _build_layout(units, coords, cfg, dtype, device, self.spatial_merge_size**2,
                               whole_pack=flash or kernels.takes_whole_pack(cfg._attn_implementation))
        cos, sin = self.rotary_pos_emb(positions)
        if layout.order is not None:
            cos, sin = cos[layout.order], sin[layout.order]
        return layout, cos, sin

    @torch.compiler.disable
    def _absolute_positions(self, grid: torch.Tensor, positions: torch.Tensor, lengths: list[int],
                            dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(N, E)``: the interpolated absolute position embedding of every row (weights planned on the host)."""
        side = math.isqrt(self.config.num_position_embeddings)
        extents = torch.repeat_interleave(grid, torch.tensor(lengths), dim=0)
        index, weight = interpolated_position_weights(positions, extents, side)
        rows = self.pos_embed(to_device(index, device))  # (N, 4, E)
        return (rows * to_device(weight, device).to(rows.dtype).unsqueeze(-1)).sum(dim=1).to(dtype)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        patch_positions: torch.Tensor | None = None,
        seq_lengths: torch.Tensor | None = None,
    ) -> ArlowVisionModelOutput | tuple:
        r"""Encode a pack of images/videos.

        Args:
            pixel_values: ``(N, C*Tp*P*P)`` patch rows, items concatenated, merge-window-major within each item.
            grid_thw: ``(n_items, 3)`` integer (t, h, w) grids in patch units; h and w multiples of ``s``.
            output_hidden_states: also return the ``depth + 1`` un-merged states ``(N, embed_dim)`` (``None``:
                ``config.output_hidden_states``).
            return_dict: ``False`` returns ``(last_hidden_state, deepstack_features[, hidden_states])`` (``None``:
                ``config.return_dict``).
            patch_positions: ``(N, 3)`` integer (t, h, w) coordinates of each row inside its item's full grid, when
                the rows are a subset (visible merge windows, each window's ``s*s`` rows contiguous). Default: every
                patch of every grid, in merge-window-major order.
            seq_lengths: ``(n_items,)`` rows per item; required with ``patch_positions`` (multiples of ``s*s``).
        Returns:
            :class:`ArlowVisionModelOutput` with ``last_hidden_state (N / s**2, hidden_size)``.
        """
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = cfg.output_hidden_states
        if return_dict is None:
            return_dict = cfg.return_dict
        grid, positions, lengths = self._check_inputs(pixel_values, grid_thw, patch_positions, seq_lengths)
        x = self.patch_embed(pixel_values)
        merge_rows = self.spatial_merge_size**2
        if cfg.num_position_embeddings:
            x = x + self._absolute_positions(grid, positions, lengths, x.dtype, x.device)

        if cfg.use_progressive_patches:
            # A coarser scale: every patch also sees the mean of its merge window.
            coarse = x.view(-1, merge_rows, x.shape[-1]).mean(dim=1, keepdim=True).expand(-1, merge_rows, -1)
            x = x + self.progressive_proj(coarse.reshape(x.shape))

        layout, cos, sin = self._plan(grid, positions, lengths, x.dtype, x.device)
        if layout.order is not None:
            x = x[layout.order]

        hidden_states = [x] if output_hidden_states else None
        deepstack = []
        taps = {block: k for k, block in enumerate(cfg.deepstack_visual_indexes)}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout)
            if hidden_states is not None:
                hidden_states.append(x)
            if i in taps:
                deepstack.append(self.deepstack_mergers[taps[i]](x))
        merged = self.merger(x)

        if layout.order is not None:
            x = x[layout.restore]
            merged = merged[layout.token_restore]
            deepstack = [d[layout.token_restore] for d in deepstack]
            if hidden_states is not None:
                hidden_states = [h[layout.restore] for h in hidden_states]
        output = ArlowVisionModelOutput(
            last_hidden_state=merged,
            deepstack_features=tuple(deepstack),
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            unmerged_state=x,
        )
        return output if return_dict else output.to_tuple()


def vision_forward_flops(config: ArlowVisionConfig, seq_lengths: list[int]) -> float:
    """Model FLOPs of one encoder forward over items of ``seq_lengths`` patch rows (each a multiple of ``s**2``):
    patch embedding, the coarse-scale projection, ``depth`` blocks (each item attends within itself), the merger and
    one DeepStack merger per tap. Conventions: :mod:`arlow.modeling.flops`."""
    lengths = [int(n) for n in seq_lengths]
    rows, width = sum(lengths), config.embed_dim
    tokens, merged = rows // config.spatial_merge_size**2, width * config.spatial_merge_size**2
    total = linear_flops(rows, config.patch_dim, width)
    if config.use_progressive_patches:
        total += linear_flops(rows, width, width)
    total += config.depth * transformer_block_flops(lengths, width, int(width * config.mlp_ratio))
    mergers = 1 + len(config.deepstack_visual_indexes)
    return total + mergers * (linear_flops(tokens, merged, merged) + linear_flops(tokens, merged, config.hidden_size))
