"""``attn_implementation="arlow_blocked_cpu"``: softmax attention in cache-sized blocks, for bf16 inference on CPU.

PyTorch's fused CPU kernel (``F.scaled_dot_product_attention``) runs bf16 no faster than fp32. This kernel computes
each block of (heads, query rows) as two bf16 matrix products with a softmax between them, the block's scores kept
in cache (measurements and the allocator notes: docs/cpu-inference.md). Where it does not apply - autograd
recording, not bf16, not CPU, a causal or boolean mask, grouped-query heads - :func:`attention` calls transformers'
SDPA forward unchanged, so a model loaded with this kernel trains and decodes exactly as with ``"sdpa"``.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "arlow_blocked_cpu"
MASK = sdpa_mask  # the masks its callers build: SDPA's (additive float masks run blocked, boolean ones SDPA)
WHOLE_PACK = False  # takes one call per group of equal-length items, not the whole pack with cu_seqlens

# Bytes of bf16 scores per block (heads x query rows x L): about the L2 cache of the 2-core test host
# (docs/cpu-inference.md, bench_kernels.py --heads).
BLOCK_BYTES = 2 << 20
# Elements between the two workspace buffers (17 cache lines of bf16): buffers a power of two apart put the
# softmax's reads and writes in the same cache sets.
_WORKSPACE_GAP = 544
_workspace = threading.local()


def attention_blocks(heads: int, length: int, element_size: int, budget: int) -> tuple[int, int]:
    """``(heads per block, query rows per block)`` of :func:`blocked_attention`: as many query rows as fit
    ``budget`` bytes of scores (at least 16, at most ``length``), then as many heads as fit with them."""
    per_row = length * element_size
    rows = max(16, min(length, budget // per_row))
    return max(1, min(heads, budget // (rows * per_row))), rows


def _attention_workspace(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat CPU buffers of ``numel`` elements (scores, weights), carved from one kept per thread between calls,
    so that megabyte blocks do not come back from the allocator as fresh pages on every call. Made outside
    inference mode, so that in-place writes are allowed under both ``torch.no_grad()`` and
    ``torch.inference_mode()``."""
    buffer = getattr(_workspace, "buffer", None)
    if buffer is None or buffer.numel() < 2 * numel + _WORKSPACE_GAP or buffer.dtype != dtype:
        with torch.inference_mode(False):
            buffer = torch.empty(2 * numel + _WORKSPACE_GAP, dtype=dtype)
        _workspace.buffer = buffer
    return buffer[:numel], buffer[numel + _WORKSPACE_GAP: 2 * numel + _WORKSPACE_GAP]


def blocked_attention(module: nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, **kwargs):
    """Inference softmax attention in blocks of (heads, query rows). q/k/v ``(B, H, L, D)``, mask additive
    ``(B, 1|H, L, L)``. Returns ``(out (B, L, H, D), None)``; ``out`` is a transposed view, which the caller's
    reshape to ``(B * L, H * D)`` copies once.

    Both products are bf16 matrix products and the scores stay bf16, as in eager bf16 attention; CPU softmax
    accumulates bf16 input in fp32 and rounds the weights to bf16, which the second product needs anyway.
    """
    batch, heads, length, dim = query.shape
    out = query.new_empty(batch, heads, length, dim)
    key_t = key.transpose(-1, -2)
    head_step, row_step = attention_blocks(heads, length, query.element_size(), BLOCK_BYTES)
    scores_buf, weights_buf = _attention_workspace(head_step * row_step * length, query.dtype)
    for item in range(batch):  # items one at a time: 3-D products, and the budget holds whatever the batch
        mask = None if attention_mask is None else attention_mask[item]  # (1|H, L, L)
        for h0 in range(0, heads, head_step):
            hs = slice(h0, h0 + head_step)
            head_mask = None if mask is None else mask[hs] if mask.shape[0] > 1 else mask
            for start in range(0, length, row_step):
                rows = slice(start, start + row_step)
                q = query[item, hs, rows]  # (h, r, D): the last blocks may be smaller
                shape = (q.shape[0], q.shape[1], length)
                numel = shape[0] * shape[1] * length
                scores = torch.matmul(q, key_t[item, hs], out=scores_buf[:numel].view(shape)).mul_(scaling)
                if head_mask is not None:
                    scores.add_(head_mask[:, rows])
                weights = torch.softmax(scores, dim=-1, out=weights_buf[:numel].view(shape))  # fp32 inside the kernel
                torch.matmul(weights, value[item, hs], out=out[item, hs, rows])
    return out.transpose(1, 2), None


def applies(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether :func:`attention` runs :func:`blocked_attention` for these inputs (else SDPA): bf16 CPU inference
    (autograd not recording), as many key as query heads, no causal flag, and no mask or an additive float one."""
    recording = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    mask_ok = attention_mask is None or attention_mask.dtype == query.dtype
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and not recording and not is_causal
            and key.shape[1] == query.shape[1] and query.shape[2] == key.shape[2] and mask_ok)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The registered attention function: :func:`blocked_attention` where :func:`applies`, else SDPA.
    q/k/v ``(B, H, L, D)``; returns ``(out (B, L, H, D), weights or None)`` as every transformers backend does."""
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if dropout == 0.0 and applies(query, key, attention_mask, bool(is_causal)):
        return blocked_attention(module, query, key, value, attention_mask,
                                 query.shape[-1] ** -0.5 if scaling is None else scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)
