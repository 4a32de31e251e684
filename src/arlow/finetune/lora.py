"""LoRA / QLoRA through PEFT: apply adapters to the VLM, save them, load them back, merge them.

An adapter directory (:func:`save_adapter`) holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` and,
when groups other than the adapters were trained too (the merger, DeepStack mergers, gates ... see
:mod:`arlow.finetune.freezing`), ``trainable_extras.safetensors`` with those full tensors, so that
``load_adapter(base, dir)`` restores exactly the trained model. :func:`merge_adapter` folds the adapters into the
base weights (``W + B A * alpha / r``) and returns a plain :class:`ArlowForConditionalGeneration`.

QLoRA (``quantization: 4bit`` or ``8bit``) loads the base model quantized by bitsandbytes (NF4 with bf16 compute for
4-bit; the vision tower and ``lm_head`` stay unquantized) and trains LoRA adapters on top. bitsandbytes kernels need a
CUDA GPU: on a machine without one the request is refused with a ``ValueError`` before anything is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BitsAndBytesConfig

from ..modeling.multimodal import ArlowForConditionalGeneration
from ..training.config import check_keys
from .freezing import _plain_name, group_of

__all__ = ["LORA_TARGETS", "LoraSettings", "apply_lora", "save_adapter", "load_adapter", "merge_adapter",
           "check_quantization", "quantization_config", "load_quantized", "EXTRAS_FILE"]

EXTRAS_FILE = "trainable_extras.safetensors"
# Module-name regexes (PEFT full-matches a string target against each module name).
_TEXT = (r"model\.language_model\.layers\.\d+\."
         r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
_VISION = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|fc1|fc2)"
LORA_TARGETS = {"language_model": _TEXT, "vision_encoder": _VISION, "all": f"({_TEXT})|({_VISION})"}
QUANTIZATIONS = (None, "4bit", "8bit")


@dataclass
class LoraSettings:
    """The ``lora`` section of an ``arlow sft`` recipe.

    Args:
        enabled: train LoRA adapters (the ``lora`` group) instead of full weights of the language model.
        r: adapter rank.
        alpha: scale numerator; the update is ``B A * alpha / r``.
        dropout: dropout on the adapter input.
        target: ``"language_model"`` (attention + MLP projections of every text layer), ``"vision_encoder"``,
            ``"all"``, or a list of module-name suffixes / a regex string for PEFT.
        quantization: ``None`` (LoRA), ``"4bit"`` or ``"8bit"`` (QLoRA; bitsandbytes + a CUDA GPU).
        save_merged: at each checkpoint also write the merged model as a plain model folder.
    """

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target: str | list = field(default="language_model")
    quantization: str | None = None
    save_merged: bool = True

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"lora.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization is not None and not self.enabled:
            raise ValueError("lora.quantization (QLoRA) needs lora.enabled: true - quantized weights cannot be trained "
                             "directly")
        if isinstance(self.target, str) and not self.target:
            raise ValueError("lora.target must name modules")

    @classmethod
    def from_dict(cls, values: dict | None) -> "LoraSettings":
        values = dict(values or {})
        check_keys("lora", values, list(cls.__dataclass_fields__))
        return cls(**values)

    def target_modules(self):
        if isinstance(self.target, str):
            return LORA_TARGETS.get(self.target, self.target)
        return list(self.target)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules(), bias="none")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# QLoRA


def check_quantization(quantization: str | None) -> None:
    """Refuse QLoRA where it cannot run: bitsandbytes missing or no CUDA GPU."""
    if quantization is None:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"lora.quantization={quantization!r} (QLoRA) needs bitsandbytes and a CUDA GPU, and this machine has no "
            "GPU. On CPU train plain LoRA (lora.quantization: null) or full fine-tuning."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"lora.quantization={quantization!r} (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def quantization_config(quantization: str):
    """bitsandbytes settings: NF4 + double quantization + bf16 compute (4-bit) or LLM.int8 (8-bit). The vision
    tower and the LM head stay in full precision (small, and sensitive)."""
    skip = ["visual", "lm_head"]
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"unknown quantization {quantization!r}; use '4bit' or '8bit'")


def quantized_load_device(env: Mapping[str, str], device_count: int) -> int:
    """The CUDA device index this process loads its quantized weights on.

    ``LOCAL_RANK`` (set per node by torchrun, ``accelerate launch`` and DeepSpeed) picks the GPU. ``RANK %
    device_count`` agrees with it only when every node runs one process per visible GPU: with 4 processes on
    each 8-GPU node, global rank 5 (node 1, local rank 1) would take GPU 5, which no process of that node
    should use, and two nodes' processes double up. With one visible GPU per process (``CUDA_VISIBLE_DEVICES``
    set per process) it is device 0 whatever the rank. Without ``LOCAL_RANK`` the global rank serves on a
    single node (``WORLD_SIZE <= device_count``); a plain ``python`` run uses device 0.
    """
    if device_count < 1:
        raise ValueError("quantized loading needs a CUDA GPU and torch sees none")
    if "LOCAL_RANK" in env:
        index, source = int(env["LOCAL_RANK"]), "LOCAL_RANK"
    elif "RANK" in env:
        if int(env.get("WORLD_SIZE", 1)) > device_count:
            raise ValueError(
                f"RANK is set but LOCAL_RANK is not, and WORLD_SIZE={env.get('WORLD_SIZE')} exceeds this node's "
                f"{device_count} GPUs, so the GPU of this process is unknown; launch with torchrun or accelerate "
                "launch, or export LOCAL_RANK (the process's index on its node)"
            )
        index, source = int(env["RANK"]), "RANK"
    else:
        return 0
    if device_count == 1:
        return 0
    if not 0 <= index < device_count:
        raise ValueError(f"{source}={index} but this process sees {device_count} GPUs (0..{device_count - 1}); "
                         "check CUDA_VISIBLE_DEVICES and the launcher's --nproc_per_node")
    return index


def load_quantized(path: str | Path, quantization: str, attn_implementation: str = "sdpa",
                   gradient_checkpointing: bool = False):
    """Load a VLM folder quantized for QLoRA on this process's GPU, ready for :func:`apply_lora`."""
    check_quantization(quantization)
    from peft import prepare_model_for_kbit_training

    device = quantized_load_device(os.environ, torch.cuda.device_count())
    model = ArlowForConditionalGeneration.from_pretrained(
        str(path), quantization_config=quantization_config(quantization), device_map={"": device},
        dtype=torch.bfloat16, attn_implementation=attn_implementation,
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


# ----------------------------------------------------------------------------------------------------------------
# Adapters


def apply_lora(model: nn.Module, settings: LoraSettings):
    """Wrap ``model`` with LoRA adapters (PEFT). Every base weight is frozen by PEFT; re-apply the trainable groups
    with :func:`arlow.finetune.freezing.apply_freezing` afterwards."""
    from peft import get_peft_model

    if not settings.enabled:
        raise ValueError("apply_lora needs settings.enabled = True")
    try:
        return get_peft_model(model, settings.peft_config())
    except ValueError as err:
        raise ValueError(f"LoRA could not be applied with target {settings.target!r}: {err}. Targets: "
                         f"{sorted(LORA_TARGETS)} or module-name suffixes such as ['q_proj', 'v_proj']") from None


def save_adapter(model, directory: str | Path) -> Path:
    """Write the adapters of a PEFT-wrapped VLM and the full tensors of its other trainable parameters."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    extras = {_plain_name(name): p.detach().to("cpu").contiguous().clone()
              for name, p in model.named_parameters() if p.requires_grad and group_of(name) != "lora"}
    if extras:
        save_file(extras, str(directory / EXTRAS_FILE))
    return directory


def load_adapter(base: nn.Module, directory: str | Path, is_trainable: bool = False):
    """``base`` VLM + the adapter folder written by :func:`save_adapter` -> the PEFT model that was saved."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no adapter_config.json (write it with save_adapter)")
    extras_file = directory / EXTRAS_FILE
    if extras_file.is_file():
        extras = load_file(str(extras_file))
        own = dict(base.named_parameters())
        missing = [k for k in extras if k not in own]
        if missing:
            raise ValueError(f"{extras_file} holds tensors the base model lacks: {missing[:5]}")
        with torch.no_grad():
            for key, value in extras.items():
                if own[key].shape != value.shape:
                    raise ValueError(f"{key}: adapter folder has shape {tuple(value.shape)}, base model "
                                     f"{tuple(own[key].shape)}")
                own[key].copy_(value.to(own[key].dtype))
    return PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)


def merge_adapter(model) -> nn.Module:
    """Fold the LoRA updates into the base weights; returns the plain VLM (the PEFT wrapper is consumed)."""
    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge")
    return model.merge_and_unload()
