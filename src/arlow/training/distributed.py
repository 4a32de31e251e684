"""Accelerate setup: device, precision, DDP/FSDP/DeepSpeed plugins. No distributed code of our own lives here.

Launch the same script with any launcher (see docs/training.md)::

    python train.py ...                                          # one process
    torchrun --nproc_per_node 8 train.py ...                     # DDP (NCCL on GPUs, gloo on CPU)
    accelerate launch --config_file cfg.yaml train.py ...        # DDP / FSDP / DeepSpeed from an accelerate config
    ... train.py deepspeed_config=configs/deepspeed/zero2.json   # DeepSpeed ZeRO-2 through accelerate's plugin
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType,
                               FullyShardedDataParallelPlugin)

from .config import TrainConfig

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# DeepSpeed's own defaults for the bucket sizes accelerate derives from ``model.config.hidden_size`` when "auto".
_DEEPSPEED_BUCKET_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process, without initialising anything.

    Reads the initialised process group if there is one, else the variables every launcher sets (torchrun and
    ``accelerate launch`` set RANK/WORLD_SIZE), else (0, 1). Data pipelines call this to pick their shard before the
    :class:`~arlow.training.Trainer` (and its accelerator) exists; it must not create accelerate's shared state,
    because DeepSpeed on CPU needs to create it in a particular way (see :func:`build_accelerator`).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def use_cpu(config: TrainConfig) -> bool:
    """True when training runs on CPU: asked for, forced by ACCELERATE_USE_CPU, or no GPU present."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return config.cpu or flag or not torch.cuda.is_available()


def uses_deepspeed(config: TrainConfig) -> bool:
    """DeepSpeed is on when the config names a JSON, or when ``accelerate launch --use_deepspeed`` asked for it."""
    return config.deepspeed_config is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def check_precision(config: TrainConfig, on_cpu: bool) -> None:
    """Refuse fp16 on CPU: it is 100-400x slower than fp32 there and the loss scaler is a GPU feature."""
    if config.precision == "fp16" and on_cpu:
        raise ValueError(
            "precision='fp16' needs a GPU: on CPU fp16 matmuls run at ~1 GFLOP/s and dynamic loss scaling is not "
            "supported. Use precision='bf16' (autocast, fast on CPUs with bf16 support) or precision='fp32'."
        )


def resolve_deepspeed_config(source: str | Path | dict, config: TrainConfig, model: torch.nn.Module | None) -> dict:
    """Load a DeepSpeed JSON and fill the "auto" values that belong to this engine.

    The engine owns the optimizer and the lr schedule, so the JSON must not define them. Filled here:
    ``gradient_accumulation_steps`` (from the config), ``gradient_clipping`` (``max_grad_norm``, 0 = off),
    ``train_micro_batch_size_per_gpu`` (1: a micro-batch is one ``next(data)``, whatever it holds) and the bucket
    sizes accelerate would derive from ``model.config.hidden_size`` when the model has none. Precision ("auto"
    under fp16/bf16) is filled by accelerate from ``precision``. Explicit values that contradict the config raise.
    """
    if isinstance(source, dict):
        ds = copy.deepcopy(source)
        where = "the DeepSpeed config"
    else:
        path = Path(source)
        try:
            ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read DeepSpeed config {str(path)!r}: {err}") from None
        where = str(path)
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ValueError(
                f"{where} defines {owned!r}; remove it: the engine builds AdamW and the warmup-cosine schedule from "
                "TrainConfig (learning_rate, betas, weight_decay, warmup_steps, min_lr_ratio)."
            )

    def fill(key: str, value: Any, name: str) -> None:
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif float(current) != float(value):
            raise ValueError(f'{where} sets {key}={current} but TrainConfig.{name}={value}; set it to "auto" or make them agree.')

    fill("gradient_accumulation_steps", config.gradient_accumulation_steps, "gradient_accumulation_steps")
    fill("gradient_clipping", float(config.clip_norm or 0.0), "max_grad_norm")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = 1
    ds.pop("train_batch_size", None)  # derived by accelerate as micro * accumulation * world

    for section, wanted in (("fp16", config.precision == "fp16"), ("bf16", config.precision == "bf16")):
        enabled = ds.get(section, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != wanted:
            raise ValueError(
                f'{where} sets {section}.enabled={enabled} but TrainConfig.precision={config.precision!r}; set it to "auto".'
            )

    zero = ds.setdefault("zero_optimization", {})
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        for key, default in _DEEPSPEED_BUCKET_DEFAULTS.items():
            if zero.get(key) == "auto":
                zero[key] = default
    return ds


def build_accelerator(config: TrainConfig, model: torch.nn.Module | None = None):
    """Create the :class:`accelerate.Accelerator` for ``config`` (call once per process, before anything else
    creates accelerate's shared state).

    - device: GPU when present (NCCL), else CPU (gloo); ``config.cpu`` forces CPU.
    - precision: ``fp32`` -> no autocast, ``bf16`` -> bf16 autocast, ``fp16`` -> fp16 autocast + dynamic loss
      scaling (refused on CPU).
    - DeepSpeed: ``config.deepspeed_config`` (or an ``accelerate launch`` DeepSpeed config) through accelerate's
      ``DeepSpeedPlugin``. On CPU DeepSpeed needs the process group created as gloo first, and accelerate must not
      be told "CPU" afterwards (it would silently drop DeepSpeed), so that is arranged here.
    - FSDP: from an ``accelerate launch`` config (``--use_fsdp`` / ``distributed_type: FSDP``).
    """
    on_cpu = use_cpu(config)
    check_precision(config, on_cpu)
    if uses_fsdp() and uses_deepspeed(config):
        # accelerate would take one and drop the other without a word
        raise ValueError(
            "the launcher asked for FSDP (accelerate launch with an FSDP config) and the training config for DeepSpeed "
            f"(train.deepspeed_config={config.deepspeed_config}); pick one: train.deepspeed_config=null for FSDP "
            "(the model_card recipe sets zero2), or launch without the FSDP config for DeepSpeed")
    if on_cpu:
        # Else DeepSpeed, when installed, guesses its accelerator at its first use (possibly mid-run, through the
        # progress bar) and logs "Setting accelerator to CPU ..." about it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _forget_single_process_state()
    kwargs: dict[str, Any] = {
        "mixed_precision": MIXED_PRECISION[config.precision],
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)],
    }
    if uses_deepspeed(config):
        if config.deepspeed_config is not None:
            source: Any = config.deepspeed_config
        else:
            source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
            if not source or source == "none":
                raise ValueError(
                    "accelerate launch asked for DeepSpeed without a JSON config; pass --deepspeed_config_file "
                    "configs/deepspeed/zero2.json or set TrainConfig.deepspeed_config."
                )
        ds = resolve_deepspeed_config(source, config, model)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=ds,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            gradient_clipping=float(config.clip_norm or 0.0),
        )
        if on_cpu:
            PartialState(cpu=True, backend="gloo")
            os.environ.pop("ACCELERATE_USE_CPU", None)
    else:
        kwargs["cpu"] = on_cpu
    accelerator = Accelerator(**kwargs)
    if on_cpu and uses_fsdp() and accelerator.num_processes > 1:
        _shard_on_cpu(accelerator)
    return accelerator


def uses_fsdp() -> bool:
    """FSDP was asked for by ``accelerate launch`` (``distributed_type: FSDP`` / ``--use_fsdp``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def _shard_on_cpu(accelerator) -> None:
    """Make FSDP2 real on CPU processes. accelerate only turns FSDP on for accelerator device types and otherwise
    trains with plain DDP without a word; FSDP2's ``fully_shard`` itself works on a CPU device mesh over gloo, so
    the accelerator is switched to accelerate's own FSDP2 path (the plugin read from the launcher's FSDP_*
    variables)."""
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on CPU processes needs FSDP2 (fsdp_version: 2 in the accelerate config, as the shipped "
            "configs/accelerate/fsdp.yaml has): FSDP1 has no CPU support"
        )
    # AcceleratorState copies PartialState's fields over its own whenever it is constructed again (accelerate's
    # utilities do that), so both shared states must say FSDP.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _forget_single_process_state() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with other settings (precision,
    device). In a single, non-distributed process nothing depends on the old state, so a second Trainer in the same
    process (a notebook, a test, stage 2 after stage 1) starts from a clean one. Distributed state is never reset."""
    if not PartialState._shared_state:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def host_process_group():
    """A process group whose collectives run on the host: the default group when it is gloo (CPU training), else
    a gloo group over the same processes. A flag reduced on the GPU's NCCL group and read with ``.item()`` waits for
    every kernel queued before it (the host stops feeding the device once per read); over gloo the hosts agree
    without touching the device queue. A collective: every process calls it, in the same order."""
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, whose ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def allreduce_bandwidth(device: torch.device, probe_bytes: int | None = None) -> float:
    """Bytes per second of an all-reduce over the default process group, measured on a probe buffer (64 MiB on
    GPUs, large enough that latency is negligible; 4 MiB on CPUs). A collective: every process calls it."""
    if probe_bytes is None:
        probe_bytes = (64 << 20) if device.type != "cpu" else (4 << 20)
    buffer = torch.zeros(probe_bytes // 4, dtype=torch.float32, device=device)
    torch.distributed.all_reduce(buffer)  # warm-up: connection set-up and allocator
    synchronize(device)
    start = time.perf_counter()
    torch.distributed.all_reduce(buffer)
    synchronize(device)
    return probe_bytes / max(time.perf_counter() - start, 1e-9)
