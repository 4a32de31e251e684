"""``attn_implementation="arlow_flex"``: the vision encoder's whole pack, locality bias included, in one fused
kernel (PyTorch's ``flex_attention``).

Flash attention takes packing (``cu_seqlens``) but no per-pair score bias, so with the locality bias on (the
default) the encoder could not use it. ``flex_attention`` generates one kernel from two small functions:

* a *block mask* from each row's item id (``doc[q] == doc[kv]``): tiles of the ``(N, N)`` score matrix that cross
  two items are skipped without being computed, which is what varlen packing saves;
* a *score modification* adding the locality bias ``-strength * d - 100 * strength * [d > window]`` from the
  rows' normalised (t, h, w) coordinates, computed per tile in registers (the dense ``(N, N)`` bias never exists).

On GPUs the kernel is compiled (``torch.compile(flex_attention)``: twice per process, the second time with the
pack length symbolic, see ``_compiled_flex``); elsewhere
flex runs its eager reference (correct, unfused: for tests and CPU rehearsals). Calls that are not the vision
pack (a text model loaded with this implementation) go to SDPA unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "arlow_flex"
MASK = sdpa_mask  # text-model callers get SDPA masks and SDPA (see ``attention``)
WHOLE_PACK = True  # takes the whole pack: (1, H, N, D) with cu_seq_lens_q and locality_coords


@functools.cache
def _compiled_flex():
    """The fused kernel. Shapes are left to dynamo's automatic dynamism (not ``dynamic=False``): a pack's length
    changes from batch to batch, and with static shapes every new length compiled a new kernel until dynamo's
    recompile limit (8) sent the rest of the run to flex's unfused eager path, which materialises every ``(N, N)``
    score matrix. Automatic dynamism compiles once for the first length and once, symbolically, on the second, then
    never again (measured: 2 graphs for 5 lengths, against one per length)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention_eager():
    """Flex's unfused reference (correct everywhere; materialises each ``(N, N)`` score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def select_kernel(device: torch.device):
    """The compiled kernel on GPUs, the eager reference elsewhere (CPU flex has no backward)."""
    return _compiled_flex() if device.type == "cuda" else flex_attention_eager()


_flex = select_kernel  # the kernel pack_attention calls (a module attribute, so checks can swap it)


def pack_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                   scaling: float, coords: torch.Tensor | None = None, strength: float = 0.0,
                   window: float = 0.0) -> torch.Tensor:
    """Attention confined to each item of a pack, with the optional locality bias.

    Args:
        query, key, value: ``(1, H, N, D)``, the items' rows concatenated.
        cu_seqlens: ``(n_items + 1,)`` int row offsets of the items.
        coords: ``(N, 3)`` float normalised coordinates (:func:`arlow.modeling.vision.normalized_coordinates`), or
            ``None`` for no bias.
        strength, window: the bias's parameters (``config.deformable_attention_strength`` / ``_window``).
    Returns:
        ``(1, N, H, D)``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n = query.shape[2]
    device = query.device
    if device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise ValueError(
            "attn_implementation='arlow_flex' has no backward on CPU (PyTorch's flex_attention supports CPU "
            "inference only); train on CPU with attn_implementation='sdpa', or on a GPU")
    counts = cu_seqlens[1:] - cu_seqlens[:-1]
    # output_size: the pack's length is known on the host, so no device read to size the result
    doc = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts.to(device), output_size=n)

    def same_item(b, h, q, kv):
        return doc[q] == doc[kv]

    block_mask = create_block_mask(same_item, None, None, n, n, device=device)
    score_mod = None
    if coords is not None:
        # one contiguous 1-D table per axis, read with scalar indices: the compiled kernel mis-read rows of the
        # (N, 3) table indexed as c[q][axis] (wrong scores on compiled CPU flex; eager flex was right)
        ct, ch, cw = (axis.contiguous() for axis in coords.float().unbind(1))

        def score_mod(score, b, h, q, kv):
            dt, dh, dw = ct[q] - ct[kv], ch[q] - ch[kv], cw[q] - cw[kv]
            d = torch.sqrt(dt * dt + dh * dh + dw * dw)
            bias = -strength * d
            if window > 0:
                bias = bias - (d > window).to(d.dtype) * (100.0 * strength)
            return score + bias.to(score.dtype)

    out = _flex(device)(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    return out.transpose(1, 2)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The registered attention function: :func:`pack_attention` for the vision encoder's pack (called with
    ``cu_seq_lens_q``), SDPA for anything else. Returns ``(out (B, L, H, D), None)``."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or dropout != 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    config = module.config
    coords = kwargs.get("locality_coords")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = pack_attention(query, key, value, cu, scale, coords, config.deformable_attention_strength,
                         config.deformable_attention_window)
    return out, None
