"""Device kernels behind one seam (design D12). Model files hold the model; the kernels live here.

* :mod:`.linear` - arlow's ``Linear`` with the oneDNN CPU inference path (fused bias and activation; packed weights).
* Attention kernels, each one module registered with transformers' ``AttentionInterface`` under its own name and
  chosen by the user with ``attn_implementation=<name>`` (a model is never switched to one silently):

  ================== ===========================================================================================
  name               module
  ================== ===========================================================================================
  arlow_blocked_cpu  :mod:`.blocked_attention`: bf16 CPU inference in cache-sized blocks; SDPA elsewhere
  arlow_flex         :mod:`.flex_attention`: the vision pack with the locality bias in one fused flex_attention
                     kernel (block mask per item, bias as a score modification); SDPA for other callers
  ================== ===========================================================================================

An attention kernel module defines ``NAME``, ``attention(module, query, key, value, attention_mask, scaling,
dropout=0.0, **kwargs) -> (out (B, L, H, D), weights | None)`` (q/k/v ``(B, H, L, D)``), ``MASK`` (the
``AttentionMaskInterface`` function that builds the text model's masks for it) and ``WHOLE_PACK``: ``True`` when it
takes the vision encoder's whole pack in one call (q/k/v ``(1, H, N, D)`` with ``cu_seq_lens_q``/``max_length_q``
as flash varlen does, and ``locality_coords (N, 3)`` when the locality bias is on), ``False`` when it takes one
batched call per group of equal-length items with an additive mask. Adding a kernel is one module and one entry in
:data:`ATTENTION_KERNELS`.

Importing this package (``import arlow`` does) registers the kernels.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import blocked_attention, flex_attention

ATTENTION_KERNELS = {kernel.NAME: kernel for kernel in (blocked_attention, flex_attention)}

for _name, _kernel in ATTENTION_KERNELS.items():
    AttentionInterface.register(_name, _kernel.attention)
    AttentionMaskInterface.register(_name, _kernel.MASK)


def takes_whole_pack(attn_implementation: str | None) -> bool:
    """Whether the vision encoder gives ``attn_implementation`` its whole pack in one call (see the module doc)."""
    kernel = ATTENTION_KERNELS.get(attn_implementation or "")
    return kernel is not None and kernel.WHOLE_PACK
