"""The Arlow text decoder as a vLLM model: ``ArlowForCausalLM`` with vLLM's paged attention and parallel layers.

The numbers are those of :mod:`arlow.modeling.text` (same RMSNorm, rotary tables and rotation, pre-norm residuals,
SwiGLU); what changes is the plumbing vLLM needs: tokens of all running sequences flattened into one ``(T, Hd)``
batch, attention through :class:`vllm.model_executor.layers.attention.Attention` (KV cache in paged blocks), q/k/v and
gate/up fused into tensor-parallel linears whose weights are loaded from the checkpoint's separate ``q_proj`` ...
``up_proj`` tensors.

Shapes: ``T`` tokens of this step (all sequences), ``Hd`` hidden size, ``nH``/``nKV`` query and key/value heads on
this tensor-parallel rank, ``D`` head dim. Positions are ``(T,)`` (text models) or ``(3, T)`` (t, h, w M-RoPE, inside
the VLM of :mod:`arlow.serving.vllm_multimodal`).

The model runs eagerly (no ``torch.compile`` / CUDA graphs): DeepStack additions differ from step to step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix

from ..configuration import ArlowTextConfig
from ..modeling.rope import apply_rotary
from ..modeling.text import ArlowRMSNorm, ArlowTextRotaryEmbedding

__all__ = ["ArlowDecoder", "ArlowForCausalLM", "load_arlow_weights"]

# checkpoint name piece -> (fused vLLM parameter, shard)
_FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class ArlowVllmAttention(nn.Module):
    """GQA self-attention over vLLM's paged KV cache; rotary angles come in as ``cos/sin (T, 1, D)``."""

    def __init__(self, config: ArlowTextConfig, layer: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp or (config.num_key_value_heads % tp and tp % config.num_key_value_heads):
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads "
                             f"({config.num_attention_heads}) and divide or be a multiple of num_key_value_heads "
                             f"({config.num_key_value_heads})")
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias,
                                          quant_config=quant, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        if config.use_qk_norm:
            self.q_norm = ArlowRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = ArlowRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        window = config.sliding_window if config.layer_types[layer] == "sliding_attention" else None
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant,
                              per_layer_sliding_window=window, prefix=f"{prefix}.attn")

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``hidden (T, Hd)`` -> ``(T, Hd)``."""
        tokens = hidden.shape[0]
        qkv, _ = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attn(q.reshape(tokens, q_size), k.reshape(tokens, kv_size), v)
        return self.o_proj(out)[0]


class ArlowVllmMLP(nn.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))`` with gate and up fused into one column-parallel linear."""

    def __init__(self, config: ArlowTextConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=False, quant_config=quant, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           quant_config=quant, prefix=f"{prefix}.down_proj")
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)[0].chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)[0]


class ArlowVllmDecoderLayer(nn.Module):
    """Pre-norm block: ``h += attn(norm1(h))``; ``h += mlp(norm2(h))`` on ``(T, Hd)``."""

    def __init__(self, config: ArlowTextConfig, layer: int, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.self_attn = ArlowVllmAttention(config, layer, vllm_config, f"{prefix}.self_attn")
        self.mlp = ArlowVllmMLP(config, vllm_config, f"{prefix}.mlp")
        self.input_layernorm = ArlowRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ArlowRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class ArlowDecoder(nn.Module):
    """Embeddings, decoder layers and final norm; weight names as ``ArlowTextModel``'s (``embed_tokens``,
    ``layers.{l}...``, ``norm``, ``visual_gates``)."""

    def __init__(self, config: ArlowTextConfig, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(ArlowVllmDecoderLayer(config, i, vllm_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = ArlowRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Arlow's own rotary module: the same tables (rope scaling variants included) as transformers' generate().
        self.rotary_emb = ArlowTextRotaryEmbedding(config)
        self.visual_gates = nn.Parameter(torch.zeros(config.num_hidden_layers)) \
            if config.use_gated_cross_attention else None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions (T,)`` or ``(3, T)`` -> fp32 ``cos, sin (T, 1, D)`` (broadcast over heads)."""
        batched = positions[None] if positions.ndim == 1 else positions[:, None]  # (1, T) or (3, 1, T)
        cos, sin = self.rotary_emb(hidden, batched)
        return cos[0, :, None], sin[0, :, None]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None,
                deepstack: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``deepstack``: ``{layer: (T, Hd)}`` added right after that layer (zero rows at text tokens), already
        scaled by the layer's gate. Returns the normed ``(T, Hd)`` states."""
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        cos, sin = self.rotary_tables(hidden, positions)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin)
            if deepstack and i in deepstack:
                hidden = hidden + deepstack[i]
        return self.norm(hidden)


def load_arlow_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       rename=lambda name: name, skip=frozenset()) -> set[str]:
    """Load checkpoint tensors into ``module``: ``q/k/v_proj`` and ``gate/up_proj`` go into their fused vLLM
    parameters through the parameters' shard loaders, everything else is copied by name (after ``rename``).

    Raises ``ValueError`` for a checkpoint tensor the module has no parameter for (nothing is dropped silently).
    """
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        name = rename(name)
        if name in skip:
            continue
        pieces = name.split(".")
        fused = next(((i, _FUSED[p]) for i, p in enumerate(pieces) if p in _FUSED), None)
        if fused is not None:
            i, (target, shard) = fused
            name = ".".join(pieces[:i] + [target] + pieces[i + 1:])
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(module).__name__}; is this an "
                             "Arlow checkpoint of the architecture named in config.json?")
        param = params[name]
        if fused is not None:
            param.weight_loader(param, tensor, shard)
        else:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(name)
    return loaded


class ArlowForCausalLM(nn.Module):
    """vLLM model for ``ArlowForCausalLM`` checkpoints: :class:`ArlowDecoder` (``model.*``) + ``lm_head``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", tie_word_embeddings: bool | None = None):
        """``tie_word_embeddings`` overrides the text config's (a VLM ties by its top-level config)."""
        super().__init__()
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.tied = config.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
        self.model = ArlowDecoder(config, vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, deepstack: dict[int, torch.Tensor] | None = None,
                **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds, deepstack)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A tied head has no tensor of its own (it is the embedding).
        skip = {"lm_head.weight"} if self.tied else set()
        return load_arlow_weights(self, weights, skip=skip)
