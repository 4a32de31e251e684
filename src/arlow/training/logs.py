"""Run logging on the main process: JSON lines, TensorBoard scalars and a tqdm progress bar.

Every record is one line of ``output_dir/log.jsonl`` (fields documented in docs/training.md and in
:data:`FIELDS`); numeric fields also go to TensorBoard as ``train/<field>`` at x = step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"

FIELDS = {
    "step": "optimizer steps completed (skipped non-finite steps included)",
    "loss": "mean training loss over the finite steps since the previous record (all processes)",
    "lr": "learning rate of the first param group at this step",
    "grad_norm": "mean global gradient 2-norm before clipping over the applied steps since the previous record",
    "loss_scale": "fp16 dynamic loss scale (null unless precision is fp16)",
    "tokens_per_s": "num_tokens of all processes' micro-batches per second since the previous record (null if absent)",
    "samples_per_s": "num_samples of all processes' micro-batches per second since the previous record (null if absent)",
    "mfu": "model FLOPs utilisation: flops_per_batch FLOPs per second / (measured peak x processes) (null if no flops_per_batch)",
    "step_time": "seconds per optimizer step since the previous record",
    "compute_time": "seconds of this record's last step measured between device synchronisations (forward, backward, optimizer; communication not hidden by overlap included)",
    "comm_time": "estimated seconds per step of gradient reduction: reductions per step x gradient bytes / all-reduce bandwidth measured at this record (0 on one process)",
    "nonfinite_skipped": "steps skipped so far because the loss or the gradient was non-finite (whole run)",
    "overflow_skipped": "fp16 steps skipped so far by the dynamic loss scaler (normal while the scale calibrates)",
    "skipped_files": "distinct unreadable data files skipped so far, all processes (null if the data does not count)",
    "elapsed": "training seconds so far, summed over resumed segments",
}


class RunLogger:
    """Writes records on the main process; on other processes every method is a no-op."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool,
        progress_bar: bool,
        total_steps: int,
        initial_step: int,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / LOG_FILE
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, initial_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from.
            self._writer = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR), purge_step=initial_step + 1)
        if progress_bar:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(record["step"])
        if self._writer is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, step)
            self._writer.flush()
        if self._bar is not None:
            shown = {}
            for key, fmt in (("loss", "{:.4g}"), ("lr", "{:.3g}"), ("tokens_per_s", "{:.4g}")):
                if clean.get(key) is not None:
                    shown[key] = fmt.format(clean[key])
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan"/"inf" keeps the line parseable by every reader
    return value


def _truncate_after(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (a resumed run rewrites what the crashed run logged later)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Parse a log.jsonl into a list of records."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
