"""Registration of the Arlow classes with the transformers Auto classes (called once by ``import arlow``)."""

from __future__ import annotations

from transformers import AutoConfig

from .configuration import ArlowConfig, ArlowTextConfig, ArlowVisionConfig


def register() -> None:
    """Register configs, models and processors. Safe to call twice (``exist_ok=True``)."""
    AutoConfig.register(ArlowVisionConfig.model_type, ArlowVisionConfig, exist_ok=True)
    AutoConfig.register(ArlowTextConfig.model_type, ArlowTextConfig, exist_ok=True)
    AutoConfig.register(ArlowConfig.model_type, ArlowConfig, exist_ok=True)
    # --- vision encoder ---
    # --- text decoder ---
    # --- multimodal model ---
    # --- processors ---
