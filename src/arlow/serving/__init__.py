"""Serving Arlow models with vLLM (docs/serving.md).

:mod:`arlow.serving.vllm_plugin` is the ``vllm.general_plugins`` entry point; it registers Arlow's configs and model
classes in every vLLM process. :mod:`arlow.serving.vllm_text` and :mod:`arlow.serving.vllm_multimodal` hold the vLLM
model classes and import vLLM, so nothing here is imported by ``import arlow``.
"""
