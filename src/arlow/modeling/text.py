"""The Arlow text decoder: a pre-norm GQA transformer with RoPE / M-RoPE, sliding-window layers and SwiGLU.

Read top to bottom: RMSNorm -> rotary table -> attention -> MLP -> decoder layer -> ``ArlowTextModel`` (embeddings,
masks, layers, DeepStack additions, final norm) -> task heads.

Shapes: ``B`` batch, ``S`` new tokens, ``K`` attended keys (cache + new), ``Hd`` hidden size, ``nH``/``nKV`` query and
key/value heads, ``D`` head dim.

Parameter names are the reference fork's (``model.embed_tokens``, ``model.layers.{l}.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``,
``model.visual_gates``), so its text weights load by name. Its defects are not reproduced: the rotary embedding is a
true rotation (half-split layout on both the table and the rotated channels), the attention mask is kept for
one-token decode steps, positions follow left padding, and decoder layers really checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .._compat import CACHE, ActivationCheckpointingCompat, output_cache, slice_logits_to_keep, take_cache
from ..configuration import ArlowTextConfig
from .kernels.linear import Linear, linear_then
from .rope import apply_rotary, mrope_slot_axes, multi_axis_angles, rope_inv_freq

__all__ = [
    "decoder_forward_flops",
    "ArlowRMSNorm",
    "ArlowTextRotaryEmbedding",
    "ArlowAttention",
    "ArlowMLP",
    "ArlowDecoderLayer",
    "ArlowTextPreTrainedModel",
    "ArlowTextModel",
    "ArlowForCausalLM",
    "ArlowForSequenceClassification",
    "ArlowForTokenClassification",
    "ArlowForQuestionAnswering",
]


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Skipping the call when p == 0 keeps one-token decode steps free of no-op kernels.
    return F.dropout(x, p, training) if p > 0.0 and training else x


class ArlowRMSNorm(nn.Module):
    """``x (..., N) -> (..., N)``: ``weight * cast_back(x / sqrt(mean(x^2) + eps))`` with statistics in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class ArlowTextRotaryEmbedding(nn.Module):
    """cos/sin tables of the decoder's rotary embedding, for 1-D or multi-axis (t, h, w) positions.

    ``inv_freq`` comes from ``compute_default_rope_parameters`` for ``rope_type="default"`` and from transformers'
    ``ROPE_INIT_FUNCTIONS`` otherwise (linear, dynamic, yarn, longrope, llama3, ...), together with their
    ``attention_scaling``. ``original_inv_freq`` and the class name let transformers' default ``_init_weights`` restore
    both non-persistent buffers after ``from_pretrained`` builds the model on the meta device.
    """

    inv_freq: torch.Tensor
    original_inv_freq: torch.Tensor

    def __init__(self, config: ArlowTextConfig, device=None):
        super().__init__()
        self.config = config
        params = config.rope_parameters or {}
        self.rope_type = params.get("rope_type", "default")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} is not supported: Arlow "
                "rotates every channel of a head. Remove partial_rotary_factor (or set it to 1.0)."
            )
        if self.rope_type == "default":
            init_fn: Callable = self.compute_default_rope_parameters
        elif self.rope_type in ROPE_INIT_FUNCTIONS:
            init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        else:
            raise ValueError(
                f"rope_parameters.rope_type={self.rope_type!r} is unknown; use 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}"
            )
        inv_freq, self.attention_scaling = init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        # Read by transformers' dynamic_rope_update (dynamic NTK grows and resets the table).
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self._slot_axes = mrope_slot_axes(config.mrope_sections)

    @staticmethod
    def compute_default_rope_parameters(config: ArlowTextConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE: ``(head_dim / 2,)`` inverse frequencies ``theta ** (-2j / head_dim)`` and scaling 1.0."""
        return rope_inv_freq(config.head_dim, config.rope_parameters["rope_theta"], device=device), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles for ``position_ids`` ``(B, S)`` (1-D) or ``(3, B, S)`` (t, h, w M-RoPE).

        Returns fp32 ``cos, sin`` of shape ``(B, S, D)`` in the half-split layout (``x`` only gives the device).
        The 3-D path assigns each frequency slot to one axis (``mrope_sections``, round-robin); with three equal rows
        it is bitwise identical to the 1-D path.
        """
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        if position_ids.ndim == 2:
            angles = position_ids[..., None].float() * inv_freq
        else:
            if self._slot_axes.device != x.device:
                self._slot_axes = self._slot_axes.to(x.device)
            angles = multi_axis_angles(position_ids.permute(1, 2, 0), inv_freq, self._slot_axes)
        table = torch.cat((angles, angles), dim=-1)
        cos, sin = table.cos(), table.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, nKV, K, D) -> (B, nKV * n_rep, K, D)``: each key/value head serves ``n_rep`` consecutive query heads."""
    if n_rep == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, k, d).reshape(b, h * n_rep, k, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. q ``(B, nH, S, D)``, k/v ``(B, nKV, K, D)``, mask ``(B, 1, S, K)`` additive float or
    bool (True = attend). Returns ``(out (B, S, nH, D), weights (B, nH, S, K))``; softmax in fp32."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class ArlowAttention(nn.Module):
    """Grouped-query self-attention with rotary positions; the backend comes from ``config._attn_implementation``."""

    def __init__(self, config: ArlowTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.layer_type = config.layer_types[layer_idx]
        # Only flash attention reads this; eager and sdpa get the window from the mask.
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        width = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = Linear(width, q_width, bias=config.attention_bias)
        self.k_proj = Linear(width, kv_width, bias=config.attention_bias)
        self.v_proj = Linear(width, kv_width, bias=config.attention_bias)
        self.o_proj = Linear(q_width, width, bias=False)
        if config.use_qk_norm:
            self.q_norm = ArlowRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = ArlowRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        query_last: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states (B, S, Hd)``, ``position_embeddings`` cos/sin ``(B, 1, S, D)`` -> ``(B, S', Hd)``, weights.

        ``query_last=n`` attends from the last ``n`` positions only (``S' = n``; keys and values, and what is cached,
        still cover all ``S``); the mask must then be ``None`` (``n == 1``) or a 4-D mask over all ``S`` rows.
        """
        b, s, _ = hidden_states.shape
        cos, sin = position_embeddings
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        rows = hidden_states if query_last is None else hidden_states[:, -query_last:]
        q = self.q_proj(rows).view(b, rows.shape[1], -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if query_last is None:
            # One rotation over the query and key heads together: half the small kernels of a decode step.
            qk = apply_rotary(torch.cat((q, k), dim=2).transpose(1, 2), cos, sin)
            q, k = qk.split((self.num_heads, self.num_key_value_heads), dim=1)
        else:
            q = apply_rotary(q.transpose(1, 2), cos[..., -query_last:, :], sin[..., -query_last:, :])
            k = apply_rotary(k.transpose(1, 2), cos, sin)
            if attention_mask is not None:
                attention_mask = attention_mask[..., -query_last:, :]
        s = rows.shape[1]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(out.reshape(b, s, -1)), weights


class ArlowMLP(nn.Module):
    """SwiGLU: ``dropout(down(act(gate(x)) * up(x)))``, ``(..., Hd) -> (..., Hd)``, no biases."""

    def __init__(self, config: ArlowTextConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.mlp_dropout = config.mlp_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down_proj(linear_then(self.gate_proj, x, self.act_fn) * self.up_proj(x))
        return _dropout(h, self.mlp_dropout, self.training)


class ArlowDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``h += drop(attn(norm1(h)))``; ``h += drop(mlp(norm2(h)))``. ``(B, S, Hd) -> (B, S, Hd)``."""

    def __init__(self, config: ArlowTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ArlowAttention(config, layer_idx)
        self.mlp = ArlowMLP(config)
        self.input_layernorm = ArlowRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ArlowRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_dropout = config.resid_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_last: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``output_last=n``: the output covers only the last ``n`` positions ``(B, n, Hd)`` (see
        :meth:`ArlowAttention.forward`); the cache still receives every position's keys and values."""
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values,
            query_last=output_last, **kwargs
        )
        if output_last is not None:
            hidden_states = hidden_states[:, -output_last:]
        hidden_states = hidden_states + _dropout(attn_out, self.resid_dropout, self.training)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + _dropout(mlp_out, self.resid_dropout, self.training)


class ArlowTextPreTrainedModel(ActivationCheckpointingCompat, PreTrainedModel):
    """Shared base of the text decoder and its heads (config class, init, backend flags)."""

    config_class = ArlowTextConfig
    base_model_prefix = "model"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArlowDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # a decode step (static cache) traces without graph breaks: tests/conformance
    _can_record_outputs = {"hidden_states": ArlowDecoderLayer, "attentions": ArlowAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # from_pretrained builds on the meta device: a parameter missing from the checkpoint exists only after this.
        if isinstance(module, ArlowTextModel) and module.visual_gates is not None:
            init.zeros_(module.visual_gates)


def _positions(
    position_ids: torch.Tensor | None,
    attention_mask,
    batch: int,
    seq: int,
    past_seen: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Split ``position_ids`` into (text positions for masks/packing, rotary positions).

    Accepted: ``None``; ``(B, S)`` 1-D positions; ``(3, B, S)`` (t, h, w); ``(4, B, S)`` = [text; t; h; w].
    Without ``position_ids``, a 2-D padding mask gives ``cumsum(mask) - 1`` (left padding does not shift the real
    tokens), otherwise ``past_seen + arange(S)``.
    """
    if position_ids is None:
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and attention_mask.shape[-1] >= seq:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:].to(device)
        else:
            pos = torch.arange(past_seen, past_seen + seq, device=device).unsqueeze(0)
        return pos, pos
    shape = tuple(position_ids.shape)
    ok_batch = (1, batch)
    if position_ids.ndim == 2 and shape[0] in ok_batch and shape[1] == seq:
        return position_ids, position_ids
    if position_ids.ndim == 3 and shape[0] in (3, 4) and shape[1] in ok_batch and shape[2] == seq:
        if shape[0] == 4:
            return position_ids[0], position_ids[1:]
        # Three M-RoPE rows are no text positions: the mask builders would read them as packed sequences.
        return None, position_ids
    raise ValueError(
        f"position_ids has shape {shape}; expected (B, S), (3, B, S) [t, h, w] or (4, B, S) [text, t, h, w] with "
        f"B in {ok_batch} and S = {seq} (the number of input tokens)"
    )


class ArlowTextModel(ArlowTextPreTrainedModel):
    """The decoder stack: ``input_ids (B, S)`` or ``inputs_embeds (B, S, Hd)`` -> ``last_hidden_state (B, S, Hd)``."""

    def __init__(self, config: ArlowTextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ArlowDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ArlowRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ArlowTextRotaryEmbedding(config)
        if config.use_gated_cross_attention:
            self.visual_gates = nn.Parameter(torch.zeros(config.num_hidden_layers))
        else:
            self.visual_gates = None
        self.gradient_checkpointing = False
        self.post_init()

    def _attention_masks(self, attention_mask, inputs_embeds, past_key_values, text_positions) -> dict:
        """One mask per layer type present (a static-cache ``generate`` already passes this dict)."""
        layer_types = set(self.config.layer_types)
        if isinstance(attention_mask, Mapping):
            missing = layer_types - set(attention_mask)
            if missing:
                raise ValueError(f"attention_mask dict lacks masks for layer types {sorted(missing)}")
            return attention_mask
        kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=text_positions,
            **{CACHE: past_key_values},
        )
        masks = {}
        if "full_attention" in layer_types:
            masks["full_attention"] = create_causal_mask(**kwargs)
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _deepstack_plan(self, embeds, visual_pos_masks, batch: int, seq: int) -> dict[int, torch.Tensor]:
        """Validate DeepStack inputs; returns ``{layer: (n_visual, Hd)}`` for the layers that receive an addition."""
        if embeds is None:
            return {}
        if isinstance(embeds, Mapping):
            plan = dict(embeds)
        elif isinstance(embeds, Sequence):  # Qwen3-VL convention: entry i goes after layer i
            plan = {i: e for i, e in enumerate(embeds) if e is not None}
        else:
            raise ValueError("deepstack_visual_embeds must be a dict {text_layer: (n_visual, hidden)} or a list")
        if not plan:
            return {}
        if visual_pos_masks is None or tuple(visual_pos_masks.shape) != (batch, seq):
            got = None if visual_pos_masks is None else tuple(visual_pos_masks.shape)
            raise ValueError(f"deepstack_visual_embeds needs visual_pos_masks of shape (B, S) = {(batch, seq)}, "
                             f"got {got}")
        n_visual = int(visual_pos_masks.sum())
        start = self.config.gated_cross_attention_start_layer if self.visual_gates is not None else None
        out = {}
        for layer, feats in plan.items():
            if not 0 <= layer < self.config.num_hidden_layers:
                raise ValueError(f"deepstack_visual_embeds has layer {layer}; text layers are "
                                 f"0..{self.config.num_hidden_layers - 1}")
            if tuple(feats.shape) != (n_visual, self.config.hidden_size):
                raise ValueError(
                    f"deepstack_visual_embeds[{layer}] has shape {tuple(feats.shape)}; expected (n_visual, hidden) = "
                    f"{(n_visual, self.config.hidden_size)}, one row per True entry of visual_pos_masks"
                )
            if start is not None and layer < start:
                continue  # gated mode: layers before gated_cross_attention_start_layer get nothing
            out[layer] = feats
        return out

    def _add_visual(self, hidden: torch.Tensor, index, feats: torch.Tensor, layer: int) -> torch.Tensor:
        """``hidden (B, S, Hd)`` plus ``feats (n_visual, Hd)`` at the visual positions (row-major), out of place."""
        feats = feats.to(device=hidden.device, dtype=hidden.dtype)
        if self.visual_gates is not None:
            feats = feats * torch.sigmoid(self.visual_gates[layer]).to(hidden.dtype)
        return hidden.index_put(index, feats, accumulate=True)

    def _output_last(self, n, seq: int, last_mask, deepstack: dict, kwargs: dict) -> int | None:
        """How many final positions the last layer computes (``None`` = all); see ``forward``'s ``output_last``."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n < seq:
            return None
        if self.config._attn_implementation not in ("eager", "sdpa") or len(self.layers) - 1 in deepstack:
            return None
        if any(kwargs.get(key, getattr(self.config, key, False)) for key in ("output_hidden_states",
                                                                             "output_attentions")):
            return None
        # Without a mask, sdpa runs causal attention aligned top-left: right for one query row only.
        if last_mask is None and n > 1 or last_mask is not None and getattr(last_mask, "ndim", 0) != 4:
            return None
        return n

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        visual_pos_masks: torch.BoolTensor | None = None,
        deepstack_visual_embeds: dict[int, torch.Tensor] | list[torch.Tensor] | None = None,
        output_last: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: ``(B, S)`` token ids, or ``inputs_embeds (B, S, Hd)`` (exactly one of them).
            attention_mask: ``(B, K)`` padding mask over cache + new tokens (1 = real), a prepared 4-D mask, or a dict
                ``{layer_type: mask}``.
            position_ids: ``(B, S)``, ``(3, B, S)`` (t, h, w M-RoPE) or ``(4, B, S)`` ([text, t, h, w]).
            past_key_values: a transformers ``Cache`` (dynamic or static); created when ``use_cache`` and missing.
            visual_pos_masks: ``(B, S)`` bool, True at visual tokens.
            deepstack_visual_embeds: ``{text_layer: (n_visual, Hd)}`` added at the True positions of
                ``visual_pos_masks`` (row-major order) right after that layer; scaled by ``sigmoid(visual_gates[l])``
                when ``config.use_gated_cross_attention``.
            output_last: ``n`` = only the last ``n`` positions' outputs will be read (``logits_to_keep=n``, as in
                ``generate``). The final layer then computes its queries, MLP and output at those positions only
                (what it caches still covers all of them) and ``last_hidden_state`` is ``(B, n, Hd)``, the same
                numbers as the last ``n`` rows of the full output. Where that shortcut does not apply (hidden
                states or attentions requested, DeepStack features after the final layer, a backend other than
                eager/sdpa) the full ``(B, S, Hd)`` comes back.
        Returns:
            ``BaseModelOutputWithPast`` with ``last_hidden_state (B, S, Hd)`` (after the final norm).
        """
        past_key_values = take_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, S) or inputs_embeds (B, S, hidden)")
        if inputs_embeds is None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (B, S, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        batch, seq = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        text_positions, rope_positions = _positions(
            position_ids, attention_mask, batch, seq, past_seen, inputs_embeds.device
        )
        masks = self._attention_masks(attention_mask, inputs_embeds, past_key_values, text_positions)
        deepstack = self._deepstack_plan(deepstack_visual_embeds, visual_pos_masks, batch, seq)
        visual_index = visual_pos_masks.to(inputs_embeds.device).nonzero(as_tuple=True) if deepstack else None

        hidden = inputs_embeds
        cos, sin = self.rotary_emb(hidden, rope_positions)
        # Broadcast over heads once here instead of in every layer.
        position_embeddings = (cos.unsqueeze(1), sin.unsqueeze(1))
        last = self._output_last(output_last, seq, masks[self.config.layer_types[-1]], deepstack, kwargs)
        for i, layer in enumerate(self.layers):
            hidden = layer(
                hidden,
                attention_mask=masks[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=text_positions,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_last=last if i == len(self.layers) - 1 else None,
                **kwargs,
            )
            if i in deepstack:
                hidden = self._add_visual(hidden, visual_index, deepstack[i], i)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       **{CACHE: past_key_values if use_cache else None})


class ArlowForCausalLM(ArlowTextPreTrainedModel, GenerationMixin):
    """``ArlowTextModel`` + ``lm_head``: ``logits (B, S', vocab)`` with ``S'`` set by ``logits_to_keep``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ArlowTextConfig):
        super().__init__(config)
        self.model = ArlowTextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``labels (B, S)`` (unshifted; -100 = ignored) give the mean next-token loss, computed in fp32."""
        past_key_values = take_cache(past_key_values, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_last=logits_to_keep if labels is None else None,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE: output_cache(outputs)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ArlowForSequenceClassification(GenericForSequenceClassification, ArlowTextPreTrainedModel):
    """``model.*`` + ``score (num_labels, Hd)`` (no bias), pooled at the last non-pad token: ``logits (B, labels)``."""

    config_class = ArlowTextConfig


class ArlowForTokenClassification(GenericForTokenClassification, ArlowTextPreTrainedModel):
    """``model.*`` + dropout + ``score`` with bias: ``logits (B, S, num_labels)``."""

    config_class = ArlowTextConfig


class ArlowForQuestionAnswering(GenericForQuestionAnswering, ArlowTextPreTrainedModel):
    """``model.*`` + ``qa_outputs (2, Hd)`` with bias: ``start_logits, end_logits (B, S)``."""

    config_class = ArlowTextConfig


def decoder_forward_flops(config: ArlowTextConfig, tokens: int) -> float:
    """Model FLOPs of one decoder forward over ``tokens`` tokens by the dense rule ``2 * N * tokens`` (a training
    step: ``6 N T``), ``N`` = the weights of every layer's attention and MLP matrices plus the LM head (embeddings
    are a lookup; attention scores are not counted, as in the rule). Conventions: :mod:`arlow.modeling.flops`."""
    width, head_dim = config.hidden_size, config.head_dim
    attention = width * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    mlp = 3 * width * config.intermediate_size  # gate, up, down
    weights = config.num_hidden_layers * (attention + mlp) + width * config.vocab_size
    return 2.0 * weights * tokens
