"""The training loop: accelerate + AdamW + warmup-cosine + accumulation + clipping + non-finite guard + atomic
checkpoints with exact resume. It knows no model: anything whose ``model(**batch).loss`` is a scalar trains.

One optimizer step ("step") consumes ``gradient_accumulation_steps`` micro-batches from ``data`` on every
process. A step whose loss is non-finite on any process is skipped everywhere: no update, gradients dropped, the
remaining micro-batches of that step consumed unseen, the lr schedule still advances (a step is a position in
the schedule and in the data, applied or not).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from accelerate.utils import DistributedType, save as save_weights, send_to_device, set_seed
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from .checkpoint import (
    list_checkpoints,
    prune_checkpoints,
    read_trainer_state,
    refusing_code,
    remove_stale_temporaries,
    resolve_resume,
    safe_load,
    save_atomically,
    write_trainer_state,
)
from .config import TrainConfig
from .distributed import COMPUTE_DTYPE, allreduce_bandwidth, build_accelerator, host_process_group, synchronize
from .logs import RunLogger
from .mfu import measure_matmul_peak, model_flops_utilisation
from .optim import WarmupCosine, build_optimizer, build_param_groups, build_scheduler
from .rng import preserved_rng
from .switches import compile_blocks, enable_activation_checkpointing

COUNT_KEYS = ("num_tokens", "num_samples")  # batch keys that feed throughput and are not model inputs
SCHEDULER_FILE = "scheduler.pt"
DATA_STATE_FILE = "data_state_{rank}.pt"
RNG_STATE_FILE = "random_states_{rank}.pkl"  # written by accelerate's save_state
MODEL_FILE = "model.safetensors"
DEEPSPEED_TAG = "pytorch_model"  # the sub-directory accelerate's save_state gives DeepSpeed's own checkpoint


class TrainingStopped(RuntimeError):
    """The run stopped for a reason its message explains in one line (with the last checkpoint and how to go on)."""


class NonFiniteLossError(TrainingStopped):
    """Raised when ``max_consecutive_nonfinite`` steps in a row had a non-finite loss or gradient."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the last checkpoint."""


@dataclass
class _StepResult:
    # Kept on the device: reading them is a host sync, done only when a record is logged (``_record``).
    loss: torch.Tensor | None = None  # this process's mean micro-batch loss (None when the step was skipped)
    grad_norm: torch.Tensor | float | None = None  # global pre-clip norm of an applied step
    lr: float = 0.0
    nonfinite: bool = False
    overflow: bool = False  # fp16 loss-scaler skip
    tokens: float = 0.0
    samples: float = 0.0
    flops: float = 0.0
    has_tokens: bool = False
    has_samples: bool = False


@dataclass
class _Interval:
    """Sums since the previous log record."""

    steps: int = 0
    loss_sum: torch.Tensor | float = 0.0  # device tensor once a step added to it
    loss_count: int = 0
    norm_sum: torch.Tensor | float = 0.0
    norm_count: int = 0
    compute_time: float | None = None  # seconds of the interval's timed step (fwd + bwd + optimizer)
    comm_time: float | None = None  # estimated seconds of that step's gradient reductions
    tokens: float = 0.0
    samples: float = 0.0
    flops: float = 0.0
    has_tokens: bool = False
    has_samples: bool = False
    start: float = 0.0
    paused: float = 0.0  # checkpoint time, kept out of throughput


class Trainer:
    """Train ``model`` on ``data`` as ``config`` says.

    Args:
        config: a :class:`TrainConfig`.
        model: an ``nn.Module``; ``model(**inputs)`` returns an object or dict with a scalar ``loss``.
        data: an iterable of micro-batches (dicts of tensors, optionally ``num_tokens``/``num_samples`` ints and
            other pass-through keys) that also has ``state_dict()``/``load_state_dict(state)`` for its position,
            already sharded for this process (see :func:`arlow.training.distributed.rank_and_world`). When an
            iterator is exhausted, ``iter(data)`` is called again (the next epoch).
        param_groups: optional ``[{"params": [...], "lr": ..., "weight_decay": ...}, ...]``; 1-D parameters of
            each group get weight decay 0 (see :func:`arlow.training.optim.build_param_groups`).
        flops_per_batch: optional ``callable(batch) -> float``, the model FLOPs of forward + backward on one
            micro-batch, for MFU.
        on_checkpoint: optional ``callable(checkpoint_dir, unwrapped_model)``, run on the main process while each
            checkpoint is still its temporary folder, after the engine's files and before the rename: what it writes
            is part of the checkpoint, which appears only once the hook has finished (under ZeRO-3 read weights
            from ``checkpoint_dir/model.safetensors``). It cannot move the training RNG streams (see
            :func:`arlow.training.rng.preserved_rng`).
        on_device: optional ``callable(inputs) -> inputs``, the step's first op on each micro-batch's model inputs
            once they are on the training device (before the model and any DeepSpeed dtype cast): work moved off
            the data workers, e.g. MAE pretraining normalises uint8 pixels here
            (:class:`arlow.pretrain.pixels.DeviceNormaliser`).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        data: Iterable[Mapping[str, Any]],
        *,
        param_groups: list[dict[str, Any]] | None = None,
        flops_per_batch: Callable[[Mapping[str, Any]], float] | None = None,
        on_checkpoint: Callable[[Path, torch.nn.Module], None] | None = None,
        on_device: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_data(data)
        self.config = config
        self.data = data
        self.flops_per_batch = flops_per_batch
        self.on_checkpoint = on_checkpoint
        self.on_device = on_device
        # batch keys the model wants on the host (e.g. grids it plans index tensors from): not sent to the device
        self._host_inputs = frozenset(getattr(model, "host_input_names", ()))

        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        if config.compile:
            compile_blocks(model)
        self.accelerator = build_accelerator(config, model)
        acc = self.accelerator
        self.is_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self._is_fsdp = acc.distributed_type == DistributedType.FSDP
        set_seed(config.seed + acc.process_index)

        groups = build_param_groups(model, config.learning_rate, config.weight_decay, param_groups)
        # Hyperparameters as the config defines them; re-applied after a resume so that the config wins.
        self._group_hparams = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self._torch_optimizer = build_optimizer(groups, config.learning_rate, config.betas, config.adam_eps)
        self.scheduler = build_scheduler(self._torch_optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.model, self.optimizer = acc.prepare(model, self._torch_optimizer)

        self._input_dtype = COMPUTE_DTYPE[config.precision] if self.is_deepspeed and config.precision != "fp32" else None
        self.step = 0
        self.nonfinite_skipped = 0
        self.overflow_skipped = 0
        self.consecutive_nonfinite = 0
        self.last_loss: float | None = None  # global mean loss of the last applied step (read when logged/saved)
        self._last_loss: torch.Tensor | None = None  # its device value on this process, not yet read
        self.elapsed = 0.0
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._iterator = None
        self._host_group = host_process_group() if acc.num_processes > 1 else None

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Run until ``max_steps``; returns a summary dict (step, last_step_loss, last_logged_loss, nonfinite_skipped,
        overflow_skipped, skipped_files, elapsed, last_checkpoint, resumed_from, log_file). Raises
        :class:`NonFiniteLossError` on persistent NaN/inf."""
        cfg, acc = self.config, self.accelerator
        output_dir = Path(cfg.output_dir)
        if acc.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(output_dir)
        acc.wait_for_everyone()
        resume_from = resolve_resume(output_dir, cfg.resume)
        if resume_from is not None:
            self._load(resume_from)
            self._notice(f"resuming from {resume_from} (step {self.step} of {cfg.max_steps})")
            if acc.is_main_process and cfg.resume == "latest":
                # A run killed between a checkpoint's rename and the pruning after it kept one too many.
                prune_checkpoints(output_dir, cfg.keep_last)
        elif cfg.resume is None and list_checkpoints(output_dir):
            # A fresh run would interleave its checkpoints with another run's (and keep_last could prune its own).
            raise ValueError(
                f"{output_dir} already holds checkpoints {[p.name for _, p in list_checkpoints(output_dir)]} of an "
                "earlier run; continue it with --resume latest (train.resume=latest), or choose another "
                "train.output_dir (or delete them)."
            )
        elif cfg.resume == "latest":
            self._notice(f"--resume latest: no checkpoint in {output_dir} yet, starting a fresh run")
        peak = self._peak_flops() if self.flops_per_batch is not None else None

        logger = RunLogger(
            output_dir,
            enabled=acc.is_main_process,
            tensorboard=cfg.tensorboard,
            progress_bar=cfg.progress_bar,
            total_steps=cfg.max_steps,
            initial_step=self.step,
        )
        self._iterator = iter(self.data)
        self.model.train()
        started = time.perf_counter()
        elapsed_before = self.elapsed
        interval = _Interval(start=started)
        logged_loss = None
        try:
            while self.step < cfg.max_steps:
                logged_next = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
                result = self._timed_step(interval) if logged_next else self._train_step()
                with warnings.catch_warnings():
                    # Steps skipped as non-finite never call optimizer.step(); the schedule still advances by design.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                    self.scheduler.step()
                self.step += 1
                self.elapsed = elapsed_before + time.perf_counter() - started
                self._count(result, interval)
                logger.advance()
                stop = self.consecutive_nonfinite >= cfg.max_consecutive_nonfinite
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or stop:
                    record = self._record(interval, result, peak)
                    logged_loss = record["loss"]
                    logger.log(record)
                    interval = _Interval(start=time.perf_counter())
                if stop:
                    raise NonFiniteLossError(self._nonfinite_message())
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps:
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                    interval.paused += time.perf_counter() - t0
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"interrupted (Ctrl-C) during step {self.step + 1}. Last checkpoint: "
                f"{self.last_checkpoint or 'none written yet'}; continue with --resume latest."
            ) from None
        finally:
            logger.close()
        self._read_last_loss()
        skipped_files = self._skipped_files()
        return {
            "step": self.step,
            "last_step_loss": self.last_loss,  # the last finite step's loss alone
            "last_logged_loss": logged_loss,  # log.jsonl's "loss" of the last record: the mean over its interval
            "nonfinite_skipped": self.nonfinite_skipped,
            "overflow_skipped": self.overflow_skipped,
            "skipped_files": skipped_files,
            "elapsed": self.elapsed,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "log_file": str(logger.path),
        }

    def _train_step(self, timed: bool = False) -> _StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Host syncs: none per micro-batch; one per step outside DeepSpeed and fp16 (is the global gradient norm
        finite? under DDP the gradients are already reduced, so every process takes the same decision). Losses
        and norms stay on the device until a record is logged. ``timed``: synchronise the device around the step
        to measure its compute time (used on logged steps only; see :meth:`_timed_step`).
        """
        cfg, acc = self.config, self.accelerator
        k = cfg.gradient_accumulation_steps
        result = _StepResult(lr=float(self.scheduler.get_last_lr()[0]))
        engine = acc.deepspeed_engine_wrapped.engine if self.is_deepspeed else None
        skipped_before = engine.skipped_steps if engine is not None else 0
        losses: list[torch.Tensor] = []
        for j in range(k):
            inputs = self._account(self._next_batch_everywhere(), result)
            last = j == k - 1
            acc.sync_gradients = last
            with nullcontext() if last else acc.no_sync(self.model):
                loss = _loss_of(self.model(**inputs))
                losses.append(loss.detach().float())
                # A non-finite loss is not checked here (that would sync the host every micro-batch): its NaN/inf
                # gradients reach the global norm (all processes, after the reduction) and the step is skipped.
                acc.backward(loss)
        acc.sync_gradients = True
        step_loss = torch.stack(losses).mean()

        if engine is not None:
            # DeepSpeed checks the gradients for inf/NaN itself (fp16 overflow, bf16.check_grad_overflow) and skips
            # the step on every rank; its norm is a host float already.
            norm = engine.get_global_grad_norm()
            if engine.skipped_steps != skipped_before:
                if self.config.precision == "fp16":
                    result.overflow = True
                else:
                    result.nonfinite = True
            elif not bool(torch.isfinite(step_loss)):
                raise RuntimeError(
                    "DeepSpeed applied an optimizer step with non-finite gradients, so the weights are no longer "
                    "finite. Use ZeRO stage >= 1 and keep bf16.check_grad_overflow true in the DeepSpeed config."
                )
            else:
                result.loss = step_loss
                result.grad_norm = float(norm) if norm is not None else None
            return result

        max_norm = cfg.clip_norm if cfg.clip_norm is not None else math.inf
        norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = norm if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
        if cfg.precision != "fp16" and not bool(torch.isfinite(norm)):  # the step's one host sync
            # inf/NaN gradient (fp32/bf16), from a non-finite loss or not: skip the step
            result.nonfinite = True
        else:
            self.optimizer.step()
            if self.optimizer.step_was_skipped:
                result.overflow = True  # fp16: the scaler found inf/NaN, lowered the scale and skipped
            else:
                result.loss = step_loss
                result.grad_norm = norm.detach()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def _timed_step(self, interval: _Interval) -> _StepResult:
        """:meth:`_train_step` between device synchronisations (its compute time, communication not hidden by
        overlap included), then an estimate of its gradient-reduction time. Run on logged steps only."""
        device = self.accelerator.device
        synchronize(device)
        start = time.perf_counter()
        result = self._train_step()
        synchronize(device)
        interval.compute_time = time.perf_counter() - start
        t0 = time.perf_counter()
        interval.comm_time = self._comm_estimate()
        interval.paused += time.perf_counter() - t0
        return result

    def _comm_estimate(self) -> float:
        """Seconds per step of gradient reduction: reductions per step x gradient bytes / the all-reduce
        bandwidth measured now on a probe buffer. One reduction per step under DDP/FSDP/ZeRO-0/1; one per
        micro-batch under ZeRO >= 2, which reduces on every backward (accelerate's ``no_sync`` does nothing there)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return 0.0
        grad_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        if not self._is_fsdp and not self.is_deepspeed and self.config.precision != "fp32":
            grad_bytes = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad)  # fp32 master grads
        reductions = 1
        if self.is_deepspeed:
            stage = acc.deepspeed_engine_wrapped.engine.zero_optimization_stage()
            reductions = self.config.gradient_accumulation_steps if stage >= 2 else 1
        return reductions * grad_bytes / allreduce_bandwidth(acc.device)

    def _read_last_loss(self) -> None:
        """Set ``last_loss`` to the all-process mean of the last applied step's loss (a collective: every
        process calls this, at records, checkpoints and the end)."""
        if self._last_loss is None:
            return
        self.last_loss = self.accelerator.reduce(self._last_loss.detach().float().reshape(1), "mean").item()
        self._last_loss = None

    def _next_batch_everywhere(self) -> Mapping[str, Any]:
        """The next micro-batch; with several processes, a data error on any of them stops all of them (the others
        would otherwise wait for it in the next collective for ever). Costs one scalar all-reduce per micro-batch
        between the hosts (``_host_group``), which does not wait for the device's queued work."""
        if self._host_group is None:
            return self._next_batch()
        error = None
        try:
            batch = self._next_batch()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes have heard of it
            error = err
        flag = torch.tensor([float(error is not None)])
        torch.distributed.all_reduce(flag, group=self._host_group)
        failed = flag.item()
        if error is not None:
            raise error
        if failed:
            raise TrainingStopped(
                f"stopping at step {self.step + 1}: {int(failed)} other process(es) could not read their data (their "
                f"error is in the log). Last checkpoint: {self.last_checkpoint or 'none written yet'}; fix the data "
                "and continue with --resume latest."
            )
        return batch

    def _next_batch(self) -> Mapping[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:
            pass
        self._iterator = iter(self.data)  # next epoch
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError("data yielded no micro-batches: a fresh iter(data) was empty") from None

    def _account(self, batch: Mapping[str, Any], result: _StepResult) -> dict[str, Any]:
        """Add the batch's counts/FLOPs to ``result``; return the model inputs on the training device."""
        if not isinstance(batch, Mapping):
            raise ValueError(f"each micro-batch must be a dict of model inputs, got {type(batch).__name__}")

        if "num_tokens" in batch:
            result.tokens += float(batch["num_tokens"])
            result.has_tokens = True
        if "num_samples" in batch:
            result.samples += float(batch["num_samples"])
            result.has_samples = True
        if self.flops_per_batch is not None:
            result.flops += float(self.flops_per_batch(batch))
        inputs = {key: value for key, value in batch.items() if key not in COUNT_KEYS}
        host = {key: inputs.pop(key) for key in self._host_inputs if key in inputs}
        # non_blocking: from pinned memory (the data loader pins on GPUs) the copy does not stall the host
        inputs = send_to_device(inputs, self.accelerator.device, non_blocking=True)
        inputs.update(host)
        if self.on_device is not None:
            inputs = self.on_device(inputs)
        if self._input_dtype is not None:
            # DeepSpeed bf16/fp16 holds the model itself in low precision (no autocast): float inputs must match.
            inputs = {
                k: v.to(self._input_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in inputs.items()
            }
        return inputs

    # ------------------------------------------------------------------ bookkeeping and logs

    def _count(self, result: _StepResult, interval: _Interval) -> None:
        interval.steps += 1
        interval.tokens += result.tokens
        interval.samples += result.samples
        interval.flops += result.flops
        interval.has_tokens |= result.has_tokens
        interval.has_samples |= result.has_samples
        if result.nonfinite:
            self.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
            return
        self.consecutive_nonfinite = 0
        if result.loss is not None:
            self._last_loss = result.loss
            interval.loss_sum = interval.loss_sum + result.loss
            interval.loss_count += 1
        if result.overflow:
            self.overflow_skipped += 1
        elif result.grad_norm is not None:
            interval.norm_sum = interval.norm_sum + result.grad_norm
            interval.norm_count += 1

    def _record(self, interval: _Interval, result: _StepResult, peak: float | None) -> dict[str, Any]:
        acc = self.accelerator
        seconds = max(time.perf_counter() - interval.start - interval.paused, 1e-9)

        def scalar(value):
            if isinstance(value, torch.Tensor):
                return value.detach().to(acc.device, torch.float64).reshape(())
            return torch.tensor(float(value), dtype=torch.float64, device=acc.device)

        totals = torch.stack([scalar(v) for v in (
            interval.tokens, interval.samples, interval.flops, float(interval.has_tokens),
            float(interval.has_samples), interval.loss_sum)])
        # one reduction and one host read per record: counts, and the loss summed over processes
        tokens, samples, flops, has_tokens, has_samples, loss_sum = acc.reduce(totals, "sum").tolist()
        self._read_last_loss()
        # every process applies the same steps, so the mean over processes of per-process means is the global mean
        loss = loss_sum / acc.num_processes / interval.loss_count if interval.loss_count else None
        grad_norm = float(interval.norm_sum) / interval.norm_count if interval.norm_count else None  # same everywhere
        mfu = None
        if peak is not None and flops > 0:
            mfu = model_flops_utilisation(flops, seconds, peak * acc.num_processes)
        return {
            "step": self.step,
            "loss": loss,
            "lr": result.lr,
            "grad_norm": grad_norm,
            "loss_scale": self._loss_scale(),
            "tokens_per_s": tokens / seconds if has_tokens else None,
            "samples_per_s": samples / seconds if has_samples else None,
            "mfu": mfu,
            "step_time": seconds / max(interval.steps, 1),
            "compute_time": interval.compute_time,
            "comm_time": interval.comm_time,
            "nonfinite_skipped": self.nonfinite_skipped,
            "overflow_skipped": self.overflow_skipped,
            "skipped_files": self._skipped_files(),
            "elapsed": self.elapsed,
        }

    def _skipped_files(self) -> int | None:
        """Distinct unreadable files the data skipped so far, summed over processes (a collective); None when the
        data does not count them (it has no ``num_skipped_files``)."""
        local = getattr(self.data, "num_skipped_files", None)
        if local is None:
            return None
        acc = self.accelerator
        return int(acc.reduce(torch.tensor([float(local)], device=acc.device), "sum").item())

    def _loss_scale(self) -> float | None:
        if self.config.precision != "fp16":
            return None
        if self.is_deepspeed:
            ds_optimizer = self.accelerator.deepspeed_engine_wrapped.engine.optimizer
            scale = getattr(ds_optimizer, "loss_scale", getattr(ds_optimizer, "cur_scale", None))
            return float(scale) if scale is not None else None
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else None

    def _notice(self, message: str) -> None:
        """One line on stderr from the main process (before the progress bar starts)."""
        if self.accelerator.is_main_process:
            print(f"arlow: {message}", file=sys.stderr, flush=True)

    def _peak_flops(self) -> float:
        if self.config.peak_flops is not None:
            return self.config.peak_flops
        return measure_matmul_peak(COMPUTE_DTYPE[self.config.precision], self.accelerator.device)

    def _nonfinite_message(self) -> str:
        n = self.consecutive_nonfinite
        last = f"{self.last_checkpoint}" if self.last_checkpoint else "none written yet"
        return (
            f"training stopped at step {self.step}: the loss or gradient was NaN/inf for {n} steps in a row "
            f"({self.step - n + 1}..{self.step}, none of them changed the weights). Last checkpoint: {last}. Lower "
            f"train.learning_rate (or use train.precision=bf16/fp32, keep train.max_grad_norm) and continue with "
            f"--resume latest."
        )

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-{step}`` atomically with what the ``on_checkpoint`` hook adds (all
        processes must call this), prune old checkpoints. Refuses to save non-finite weights. Leaves every
        process's RNG streams as they were, so a run resumed from this checkpoint continues bit for bit."""
        with preserved_rng():
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        acc, cfg = self.accelerator, self.config
        self._check_finite_weights()
        self._read_last_loss()
        skipped_files = self._skipped_files()

        def write(tmp: Path) -> None:
            acc.save_state(str(tmp), safe_serialization=True)
            torch.save(self.data.state_dict(), tmp / DATA_STATE_FILE.format(rank=acc.process_index))
            if self._is_fsdp:
                # FSDP saves shards; also publish the full weights (a collective, so on every process).
                full = acc.get_state_dict(self.model)
                if full is not None:
                    save_weights(OrderedDict(full), tmp / MODEL_FILE, safe_serialization=True)

        def finalize(tmp: Path) -> None:
            if self.is_deepspeed:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                # The fp32 master weights from the ZeRO partitions just written (the module itself may be bf16/fp16).
                # Its tensors are views of one flat buffer: copy them, or safetensors' shared-storage cleanup would
                # keep only one of them.
                full = get_fp32_state_dict_from_zero_checkpoint(str(tmp), tag=DEEPSPEED_TAG)
                full = OrderedDict((name, tensor.clone()) for name, tensor in full.items())
                save_weights(full, tmp / MODEL_FILE, safe_serialization=True)
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
            unwrapped = acc.unwrap_model(self.model)
            if isinstance(unwrapped, PreTrainedModel):
                unwrapped.config.save_pretrained(tmp)  # config.json + model.safetensors: a loadable model folder
            if self.on_checkpoint is not None:
                with _quiet_hub_progress_bars():  # transformers' "Writing model shards" bars would cut the training bar
                    self.on_checkpoint(tmp, unwrapped)
            write_trainer_state(
                tmp,
                {
                    "step": self.step,
                    "nonfinite_skipped": self.nonfinite_skipped,
                    "overflow_skipped": self.overflow_skipped,
                    "skipped_files": skipped_files,
                    "consecutive_nonfinite": self.consecutive_nonfinite,
                    "last_loss": self.last_loss,
                    "elapsed": self.elapsed,
                    "world_size": acc.num_processes,
                    "config": cfg.to_dict(),
                },
            )

        path = save_atomically(
            cfg.output_dir, self.step, write, is_main=acc.is_main_process, barrier=acc.wait_for_everyone, finalize=finalize
        )
        self.last_checkpoint = path
        if acc.is_main_process:
            prune_checkpoints(cfg.output_dir, cfg.keep_last)
        acc.wait_for_everyone()
        return path

    def _check_finite_weights(self) -> None:
        acc = self.accelerator
        bad = 0.0
        for p in self.model.parameters():
            local = getattr(p, "ds_tensor", p)  # ZeRO-3 keeps this rank's shard there
            if local.numel() and not torch.isfinite(local).all():
                bad += 1
        total = acc.reduce(torch.tensor([bad], device=acc.device), "sum").item()
        if total > 0:
            raise RuntimeError(
                f"refusing to write checkpoint-{self.step}: {int(total)} parameter tensor(s) hold NaN/inf. "
                "The previous checkpoints are untouched; resume from one of them with a lower learning rate."
            )

    def _load(self, path: Path) -> None:
        acc, cfg = self.accelerator, self.config
        state = read_trainer_state(path)
        if state["world_size"] != acc.num_processes:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes but this run has {acc.num_processes}; every "
                "process restores its own data position and RNG state, so resume with the same number of processes."
            )
        saved = state.get("config", {})
        changed = sorted(k for k, v in cfg.to_dict().items() if k not in ("resume",) and saved.get(k, v) != v)
        if changed and acc.is_main_process:
            warnings.warn(f"resuming {path} with changed settings (the new values apply): {', '.join(changed)}")
        with refusing_code(f"the accelerate state in {path} (optimizer.bin, scaler.pt, model weights)"):
            acc.load_state(str(path))  # accelerate loads with weights_only=True
        # accelerate restores the RNG states but only logs when it cannot (e.g. a file that is not plain data):
        # load the file again so that a refused or missing one stops the resume instead of silently diverging.
        safe_load(path / RNG_STATE_FILE.format(rank=acc.process_index))
        self.scheduler.load_state_dict(safe_load(path / SCHEDULER_FILE))
        self.data.load_state_dict(safe_load(path / DATA_STATE_FILE.format(rank=acc.process_index)))
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.overflow_skipped = int(state["overflow_skipped"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.last_loss = state["last_loss"]
        self.elapsed = float(state["elapsed"])
        self.last_checkpoint = path
        self.resumed_from = path
        self._apply_config_hyperparameters()

    def _apply_config_hyperparameters(self) -> None:
        """After loading optimizer/scheduler state, make the config's lr/betas/eps/decay and schedule length the
        truth again (a run resumed with a larger max_steps stretches its cosine; an unchanged one is untouched)."""
        cfg = self.config
        groups = self._torch_optimizer.param_groups
        if len(groups) != len(self._group_hparams):
            raise ValueError(
                f"the checkpoint's optimizer has {len(groups)} param groups but this model/param_groups gives "
                f"{len(self._group_hparams)}; resume with the same param_groups"
            )
        for group, hparams in zip(groups, self._group_hparams):
            group.update({k: v for k, v in hparams.items() if k != "lr"})
            group["betas"] = cfg.betas
            group["eps"] = cfg.adam_eps
        sched = self.scheduler
        sched.lr_lambdas = [WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio) for _ in groups]
        sched.base_lrs = [g["initial_lr"] for g in groups]
        sched.last_epoch = self.step - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": we only reposition it
            sched.step()


@contextmanager
def _quiet_hub_progress_bars():
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_data(data: Any) -> None:
    missing = [name for name in ("__iter__", "state_dict", "load_state_dict") if not callable(getattr(data, name, None))]
    if missing:
        raise ValueError(
            f"data must be an iterable of micro-batches with state_dict()/load_state_dict() (its position, for exact "
            f"resume); {type(data).__name__} lacks {', '.join(missing)}. Wrap it in a class that records how many "
            "micro-batches were consumed and can continue from there."
        )


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model must return an object or dict with a `loss` (pass labels/targets in the batch)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"model(**batch).loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    return loss.reshape(())
