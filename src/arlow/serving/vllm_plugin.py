"""vLLM plugin (entry point group ``vllm.general_plugins``, see pyproject.toml).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) before it reads a model
folder. It makes Arlow folders loadable there: ``import arlow`` registers the configs, tokenizer and processor with
transformers' Auto classes (vLLM reads ``config.json`` and the processor through them), and the two architectures
named in Arlow ``config.json`` files are registered with vLLM's model registry by ``module:class`` strings, so the
model code (and vLLM's model layers) is imported only when such a model is actually loaded.
"""

from __future__ import annotations

ARCHITECTURES = {
    "ArlowForCausalLM": "arlow.serving.vllm_text:ArlowForCausalLM",
    "ArlowForConditionalGeneration": "arlow.serving.vllm_multimodal:ArlowForConditionalGeneration",
}


def register() -> None:
    """Register Arlow with transformers and vLLM. Safe to call more than once."""
    import arlow  # noqa: F401  (Auto-class registration)
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
