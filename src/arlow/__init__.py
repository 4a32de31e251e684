"""Arlow: vision-language models on stock transformers.

``import arlow`` registers every Arlow class with the transformers Auto classes (see :mod:`arlow.auto`), so
``AutoConfig``/``AutoModel``/``AutoModelForCausalLM``/``AutoModelForImageTextToText``/``AutoProcessor`` load
Arlow directories with no fork of transformers.
"""

from .configuration import ArlowConfig, ArlowTextConfig, ArlowVisionConfig

# Each block below is owned by one module family; keep them in this order (configs -> models -> processors).
# --- vision encoder ---
from .modeling.vision import ArlowPreTrainedModel, ArlowVisionModelOutput, ArlowVLVisionModel  # noqa: E402,F401
# --- text decoder ---
from .modeling.text import (  # noqa: E402
    ArlowForCausalLM,
    ArlowForQuestionAnswering,
    ArlowForSequenceClassification,
    ArlowForTokenClassification,
    ArlowTextModel,
    ArlowTextPreTrainedModel,
)
# --- multimodal model ---
from .modeling.multimodal import ArlowForConditionalGeneration, ArlowModel  # noqa: E402,F401
# --- CPU inference kernels (docs/cpu-inference.md) ---
from .modeling.kernels.linear import pack_weights, set_onednn_linear  # noqa: E402,F401
# --- processors ---
from .processing import (  # noqa: E402
    ArlowImageProcessor,
    ArlowProcessor,
    ArlowTokenizerFast,
    ArlowVideoProcessor,
    load_default_tokenizer,
)

from . import auto as _auto  # noqa: E402  (registration needs the classes above)

_auto.register()

__version__ = "0.1.0"
