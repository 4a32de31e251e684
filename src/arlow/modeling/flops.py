"""Model-FLOP arithmetic shared by the architectures' formulas (one per model, next to it:
:func:`arlow.modeling.vision.vision_forward_flops`, :func:`arlow.modeling.text.decoder_forward_flops`,
:func:`arlow.modeling.multimodal.vlm_forward_flops`, :func:`arlow.pretrain.mae.mae_train_flops`).

Convention (peers-and-anchors C.1): one multiply-add is 2 FLOPs; forward only (a training step is 3x, see
:func:`arlow.training.mfu.train_flops`); norms, activations and softmax are not counted. Per block (T tokens, width
D, MLP hidden F)::

    fwd_block = 8*T*D^2 (qkv + out projections) + 4*T*D*F (two-matrix MLP; 6*T*D*F gated) + 4*T^2*D (scores, attn@V)

Packed items do not attend across, so the attention term is ``4 * D * sum_i T_i^2``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["linear_flops", "attention_flops", "transformer_block_flops"]


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    """FLOPs of ``tokens`` rows through a ``d_in -> d_out`` linear layer (2 per multiply-add)."""
    return 2.0 * tokens * d_in * d_out


def attention_flops(seq_lengths: Iterable[int], width: int) -> float:
    """Score and value FLOPs of self-attention over independent sequences: ``4 * width * sum T_i^2``."""
    return 4.0 * width * float(sum(int(t) ** 2 for t in seq_lengths))


def transformer_block_flops(seq_lengths: Iterable[int], width: int, mlp_hidden: int, gated_mlp: bool = False) -> float:
    """Forward FLOPs of one pre-norm transformer block over packed sequences of the given lengths."""
    lengths = [int(t) for t in seq_lengths]
    tokens = sum(lengths)
    projections = 4 * linear_flops(tokens, width, width)
    mlp = (3 if gated_mlp else 2) * linear_flops(tokens, width, mlp_hidden)
    return projections + mlp + attention_flops(lengths, width)
