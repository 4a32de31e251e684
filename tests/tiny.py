"""The tiny configurations the tests build models from, in one place. Tests get them through the ``tiny_config``
fixture (``conftest.py``), never by importing this module.

Sizes are chosen per kind: ``"vision"`` uses 2-pixel patches so pixel rows stay short; ``"encoder"`` is the same
encoder at the real 14-pixel patch with the default options (for tests that feed it processed images); the text
decoder mixes full and sliding-window layers with GQA and a large init so argmax never ties; the VLM and MAE use the
real 14-pixel patches so processor outputs and generated media fit them.
"""

from __future__ import annotations

from arlow import ArlowConfig, ArlowTextConfig, ArlowVisionConfig
from arlow.pretrain.mae import ArlowMAEConfig

VISION = dict(depth=2, embed_dim=24, hidden_size=20, num_heads=2, patch_size=2, temporal_patch_size=2,
              spatial_merge_size=2, mlp_ratio=2.0, use_deformable_attention=False, use_progressive_patches=False,
              deepstack_visual_indexes=[], deformable_attention_window=0.6, deformable_attention_strength=2.0)
ENCODER = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=32, deepstack_visual_indexes=[0])
# 3 layers (full, sliding, sliding), GQA 4q/2kv, head_dim 12, window 4
TEXT = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
            max_window_layers=1, initializer_range=0.2, pad_token_id=0, eos_token_id=None, bos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
VLM_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, deepstack_visual_indexes=[0, 1])
VLM_TEXT = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2)  # the built-in tokenizer's vocabulary
MAE_VISION = dict(depth=6, embed_dim=32, num_heads=2, hidden_size=48, use_deformable_attention=True,
                  use_progressive_patches=True)
MAE_DECODER = dict(decoder_hidden_size=32, decoder_num_layers=2, decoder_num_heads=2)


def tiny_config(kind: str, **overrides):
    """A tiny config of ``kind``: ``"vision"`` or ``"encoder"`` (ArlowVisionConfig), ``"text"`` (ArlowTextConfig), ``"vlm"``
    (ArlowConfig; ``vision=`` / ``text=`` dicts override the sub-configs) or ``"mae"`` (ArlowMAEConfig; ``vision=``
    overrides the encoder). Other keyword arguments override the top-level fields."""
    if kind == "vision":
        return ArlowVisionConfig(**{**VISION, **overrides})
    if kind == "encoder":
        return ArlowVisionConfig(**{**ENCODER, **overrides})
    if kind == "text":
        return ArlowTextConfig(**{**TEXT, **overrides})
    vision = overrides.pop("vision", None) or {}
    if kind == "vlm":
        text = overrides.pop("text", None) or {}
        return ArlowConfig(vision_config={**VLM_VISION, **vision}, text_config={**VLM_TEXT, **text},
                           **{"tokens_per_second": 2.0, **overrides})
    if kind == "mae":
        return ArlowMAEConfig(vision_config={**MAE_VISION, **vision}, **{**MAE_DECODER, **overrides})
    raise ValueError(f"unknown kind {kind!r}; expected vision, encoder, text, vlm or mae")
