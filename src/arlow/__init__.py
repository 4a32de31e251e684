"""Arlow: vision-language models on stock transformers.

``import arlow`` registers every Arlow class with the transformers Auto classes (see :mod:`arlow.auto`), so
``AutoConfig``/``AutoModel``/``AutoModelForCausalLM``/``AutoModelForImageTextToText``/``AutoProcessor`` load
Arlow directories with no fork of transformers.
"""

from .configuration import ArlowConfig, ArlowTextConfig, ArlowVisionConfig

# Each block below is owned by one module family; keep them in this order (configs -> models -> processors).
# --- vision encoder ---
# --- text decoder ---
# --- multimodal model ---
# --- processors ---

from . import auto as _auto  # noqa: E402  (registration needs the classes above)

_auto.register()

__version__ = "0.1.0"
