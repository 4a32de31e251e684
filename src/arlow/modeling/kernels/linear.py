"""Linear layers whose CPU inference runs through oneDNN, with the following activation fused in.

PyTorch has two CPU GEMM libraries. ``F.linear`` in fp32 calls MKL's sgemm; on AMD processors MKL takes a code path
that runs at about half the speed of oneDNN (PyTorch's other CPU library, which aten already uses for bf16): on a
2-core AMD EPYC with AVX-512, a ``(3632, 512) x (512, 2048)`` product took 41 ms through ``F.linear`` and 19 ms
through oneDNN, and the 32000-wide ``lm_head`` at one row 4.7 ms against 1.8 ms (``benchmarks/bench_kernels.py``). oneDNN
also applies bias and activation in the GEMM's epilogue, while the tile is still in cache, instead of two more
passes over the output (in bf16 that saves ~4.5 ms of a 16 ms ``fc1`` + GELU).

So for inference - autograd not recording, CPU tensors, fp32 (or bf16 where oneDNN has bf16 kernels), no autocast,
not under ``torch.compile`` - :class:`Linear` calls ``torch.ops.mkldnn._linear_pointwise``. Everything else
(training, GPUs, tensor subclasses, other dtypes) takes ``F.linear`` unchanged, so gradients and GPU numerics never
differ. The two paths agree to fp32 rounding (~1e-6 relative), not bitwise: they sum in different orders.
:func:`set_onednn_linear` (or ``ARLOW_ONEDNN_LINEAR=0`` in the environment) turns the oneDNN path off.
:func:`pack_weights` (opt-in: it costs a second copy of the weights) keeps oneDNN-packed weights, which is what
makes bf16 at a few rows - decode steps - faster than aten.

:class:`Linear` keeps ``nn.Linear``'s parameters and state-dict keys, so checkpoints, PEFT (which wraps any
``nn.Linear``) and ``_init_weights`` see an ordinary linear layer. :func:`linear_then` fuses an activation only when
the layer is exactly an arlow :class:`Linear`; a PEFT-wrapped layer must add its low-rank update *before* the
activation, so it gets ``activation(layer(x))``.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, SiLUActivation

_ONEDNN_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_DTYPES = {torch.float32} | (
    {torch.bfloat16} if _ONEDNN_OP is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported() else set()
)
_enabled = _ONEDNN_OP is not None and os.environ.get("ARLOW_ONEDNN_LINEAR", "1") != "0"


def set_onednn_linear(enabled: bool) -> bool:
    """Turn the oneDNN inference path on or off for every arlow linear layer; returns the previous setting.

    Turning it on where this PyTorch build has no oneDNN (``torch.backends.mkldnn.is_available()`` is False) leaves
    it off.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled) and _ONEDNN_OP is not None
    return previous


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU have oneDNN linear kernels for ``dtype`` (fp32; bf16 where supported)."""
    return _ONEDNN_OP is not None and dtype in _ONEDNN_DTYPES


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN whatever :func:`set_onednn_linear` says (no autograd; for measuring)."""
    return _ONEDNN_OP(x, weight, bias, "none", [], "")


def _post_op(activation: nn.Module | None) -> tuple[str, str] | None:
    """oneDNN's name and algorithm for an activation it can fuse; ``None`` if it cannot."""
    if activation is None:
        return "none", ""
    kind = type(activation)
    if kind is GELUActivation:
        return "gelu", "none"  # exact (erf) GELU, in C or in transformers' Python variant alike
    if kind is GELUTanh:
        return "gelu", "tanh"
    if kind is nn.GELU:
        return "gelu", activation.approximate
    if kind in (SiLUActivation, nn.SiLU):
        return "swish", ""
    if kind is nn.ReLU:
        return "relu", ""
    return None


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not _enabled or type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.layout != torch.strided:
        return False
    if x.dtype not in _ONEDNN_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if needs_grad and torch.is_grad_enabled():
        return False
    return not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: nn.Module | None):
    post_op = _post_op(activation)
    if post_op is not None:
        return _ONEDNN_OP(x, weight, bias, post_op[0], [], post_op[1])
    return activation(_ONEDNN_OP(x, weight, bias, "none", [], ""))


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: nn.Module | None = None
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` -> ``(..., out)``.

    One oneDNN call with bias and activation fused where :mod:`this module's docstring <arlow.modeling.kernels.linear>`
    allows; otherwise ``F.linear`` followed by ``activation``.
    """
    if _use_onednn(x, weight, bias):
        return _onednn(x, weight, bias, activation)
    out = F.linear(x, weight, bias)
    return out if activation is None else activation(out)


# Layers with packed weights: layer -> ((source weight, its version), packed tensor), or None before the first call.
# Weak keys: a deleted model frees its packs; not an attribute, so state dicts, deepcopy and pickling never see it.
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PACK_ROWS_HINT = 128  # oneDNN picks the packed layout for this many input rows; measured: 1-4096 differ by < 10%


def pack_weights(model: nn.Module, enabled: bool = True) -> int:
    """Keep a oneDNN-packed copy of the weight of every arlow :class:`Linear` in ``model`` for CPU inference.

    Unpacked, oneDNN re-lays the weight out on every call; for a bf16 layer that costs more than the product at a
    few rows: packed, one decode step's ``lm_head`` (32000 x 512, one row) took 0.40 ms instead of 1.1 ms, the
    decoder's projections 1.6-2.0x less; from a few hundred rows on it makes no difference (RESULTS.md). The
    cost is memory: a second copy of every weight, made at the first inference call after packing and again after
    the weight changes (in place or replaced). ``enabled=False`` drops the copies. Returns the number of layers.
    """
    layers = [m for m in model.modules() if type(m) is Linear]
    for layer in layers:
        if enabled:
            _PACKS.setdefault(layer, None)
        else:
            _PACKS.pop(layer, None)
    return len(layers)


def _weight_for_onednn(layer: "Linear") -> torch.Tensor:
    """The layer's packed weight when it has packing on (re-packed if the weight changed), else the weight."""
    weight = layer.weight
    entry = _PACKS.get(layer, weight)
    if entry is weight:  # packing is off for this layer
        return weight
    # The source is kept alive, so no other tensor can reuse its address: same address + same version counter =
    # the same, unmodified values (``.to()`` swaps in new storage; optimisers and ``load_state_dict`` bump the
    # version).
    if entry is not None:
        (source, version), packed = entry
        if source.data_ptr() == weight.data_ptr() and version == weight._version and source.dtype == weight.dtype \
                and source.shape == weight.shape:
            return packed
    source = weight.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(source, _PACK_ROWS_HINT)
    _PACKS[layer] = ((source, weight._version), packed)
    return packed


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the oneDNN inference path of :func:`linear`.

    ``forward(x, activation=None)`` returns ``activation(linear(x))``; call it through :func:`linear_then`, which
    passes the activation only when the layer is not wrapped.
    """

    def forward(self, x: torch.Tensor, activation: nn.Module | None = None) -> torch.Tensor:
        if _use_onednn(x, self.weight, self.bias):
            return _onednn(x, _weight_for_onednn(self), self.bias, activation)
        out = F.linear(x, self.weight, self.bias)
        return out if activation is None else activation(out)


def linear_then(layer: nn.Module, x: torch.Tensor, activation: nn.Module) -> torch.Tensor:
    """``activation(layer(x))``, fused into one call when ``layer`` is exactly an arlow :class:`Linear`."""
    if type(layer) is Linear:
        return layer(x, activation=activation)
    return activation(layer(x))
