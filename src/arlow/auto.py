"""Registration of the Arlow classes with the transformers Auto classes (called once by ``import arlow``)."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoProcessor,
    AutoTokenizer,
)
# From its module: 5.17-5.18 export a torchvision-only placeholder at the top level.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.utils import is_torchvision_available

from .configuration import ArlowConfig, ArlowTextConfig, ArlowVisionConfig
from .modeling import text
from .modeling.multimodal import ArlowForConditionalGeneration, ArlowModel
from .modeling.vision import ArlowVLVisionModel
from .processing import ArlowImageProcessor, ArlowProcessor, ArlowTokenizerFast, ArlowVideoProcessor


def register() -> None:
    """Register configs, models and processors. Safe to call twice (``exist_ok=True``)."""
    AutoConfig.register(ArlowVisionConfig.model_type, ArlowVisionConfig, exist_ok=True)
    AutoConfig.register(ArlowTextConfig.model_type, ArlowTextConfig, exist_ok=True)
    AutoConfig.register(ArlowConfig.model_type, ArlowConfig, exist_ok=True)
    # --- vision encoder ---
    AutoModel.register(ArlowVisionConfig, ArlowVLVisionModel, exist_ok=True)
    # --- text decoder ---
    AutoModel.register(ArlowTextConfig, text.ArlowTextModel, exist_ok=True)
    AutoModelForCausalLM.register(ArlowTextConfig, text.ArlowForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(ArlowTextConfig, text.ArlowForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(ArlowTextConfig, text.ArlowForTokenClassification, exist_ok=True)
    AutoModelForQuestionAnswering.register(ArlowTextConfig, text.ArlowForQuestionAnswering, exist_ok=True)
    # --- multimodal model ---
    AutoModel.register(ArlowConfig, ArlowModel, exist_ok=True)
    AutoModelForImageTextToText.register(ArlowConfig, ArlowForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(ArlowConfig, ArlowForConditionalGeneration, exist_ok=True)
    # --- processors ---
    for config_class in (ArlowConfig, ArlowVisionConfig):  # a full model folder or an exported vision encoder
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": ArlowImageProcessor},
                                    exist_ok=True)
    AutoProcessor.register(ArlowConfig, ArlowProcessor, exist_ok=True)
    AutoTokenizer.register(ArlowConfig, tokenizer_class=ArlowTokenizerFast, exist_ok=True)
    if is_torchvision_available():  # AutoVideoProcessor exists only with torchvision; Arlow never needs it
        from transformers import AutoVideoProcessor

        AutoVideoProcessor.register(ArlowConfig, ArlowVideoProcessor, exist_ok=True)
