"""The run's batch arithmetic, computed before the first step: what a pretraining run amounts to.

A pretraining run is given in optimizer steps (``train.max_steps``) while data comes in epochs of token-budget
micro-batches; the two meet only through the number of processes and ``gradient_accumulation_steps``. Getting that
wrong is silent and expensive (a warm-up longer than the run, a run that never checkpoints, data that ends before
``max_steps``), so :func:`run_plan` works it out, :func:`check_plan` refuses what cannot run and warns about what
is probably a mistake, and :meth:`RunPlan.describe` is what ``arlow pretrain`` prints at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RunPlan", "run_plan", "check_plan", "accumulation_for"]


@dataclass(frozen=True)
class RunPlan:
    """Epoch 0's sizes and what they mean for a run (later epochs differ by a few micro-batches at most: the
    per-sample video draws change with the epoch)."""

    samples_per_epoch: int
    micro_batches_per_epoch: int  # over all processes
    world_size: int
    accumulation: int
    tokens_per_batch: int
    max_steps: int
    warmup_steps: int
    save_every: int
    epochs: int | None  # data.epochs (None: iterate until max_steps)

    @property
    def micro_batches_per_step(self) -> int:
        return self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_batches_per_epoch / self.micro_batches_per_step

    @property
    def available_steps(self) -> int | None:
        """Optimizer steps the data can feed (None: unlimited). The last round of an epoch may borrow from the
        next one, so only whole steps of the finite stream count."""
        if self.epochs is None:
            return None
        return self.epochs * self.micro_batches_per_epoch // self.micro_batches_per_step

    @property
    def total_steps(self) -> int:
        available = self.available_steps
        return self.max_steps if available is None else min(self.max_steps, available)

    @property
    def run_epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def warmup_fraction(self) -> float:
        return self.warmup_steps / self.total_steps

    @property
    def checkpoints(self) -> list[int]:
        """Steps at which checkpoints are written (every ``save_every``, and always the last step)."""
        steps = list(range(self.save_every, self.total_steps + 1, self.save_every)) if self.save_every else []
        if not steps or steps[-1] != self.total_steps:
            steps.append(self.total_steps)
        return steps

    def describe(self) -> str:
        """A few lines for the start-up log."""
        ckpts = self.checkpoints
        shown = ", ".join(str(s) for s in ckpts) if len(ckpts) <= 4 else f"{ckpts[0]}, {ckpts[1]}, ..., {ckpts[-1]}"
        return "\n".join([
            f"data: {self.samples_per_epoch:,} samples per epoch -> {self.micro_batches_per_epoch:,} micro-batches of "
            f"<= {self.tokens_per_batch:,} patch rows",
            f"step: {self.world_size} process(es) x {self.accumulation} micro-batch(es) = "
            f"{self.micro_batches_per_step} micro-batches per optimizer step -> {self.steps_per_epoch:,.1f} steps "
            "per epoch",
            f"run: {self.total_steps:,} steps = {self.run_epochs:,.2f} epochs "
            f"({'data.epochs=' + str(self.epochs) if self.epochs is not None else 'epochs repeat with a new shuffle'}"
            f"); warm-up {self.warmup_steps:,} steps = {100 * self.warmup_fraction:.1f}% of the run",
            f"checkpoints: {len(ckpts)} ({shown})",
        ])


def run_plan(data, world_size: int, train_config) -> RunPlan:
    """The plan of ``data`` (a :class:`~arlow.pretrain.data.PretrainData`) under ``train_config``."""
    return RunPlan(
        samples_per_epoch=len(data.epoch_samples(0)[0]),
        micro_batches_per_epoch=data.epoch_size(0),
        world_size=world_size,
        accumulation=train_config.gradient_accumulation_steps,
        tokens_per_batch=data.tokens_per_batch,
        max_steps=train_config.max_steps,
        warmup_steps=train_config.warmup_steps,
        save_every=train_config.save_every,
        epochs=data.epochs,
    )


def check_plan(plan: RunPlan) -> list[str]:
    """Raise ``ValueError`` for a run that cannot do what it says; return warnings for likely mistakes."""
    available = plan.available_steps
    if available is not None and available < 1:
        raise ValueError(
            f"data.epochs={plan.epochs} gives {plan.epochs * plan.micro_batches_per_epoch} micro-batches but one "
            f"optimizer step needs {plan.micro_batches_per_step} ({plan.world_size} processes x "
            f"{plan.accumulation} accumulation): raise data.epochs or set it to null")
    if available is not None and plan.max_steps > available:
        raise ValueError(
            f"data.epochs={plan.epochs} feeds {available:,} optimizer steps ({plan.steps_per_epoch:,.1f} per epoch) "
            f"but train.max_steps={plan.max_steps:,}; the data would run out mid-run. Set data.epochs: null "
            f"(epochs repeat with a new shuffle until max_steps) or train.max_steps <= {available:,} (the lr "
            "schedule is laid out over max_steps)")
    warnings = []
    if plan.warmup_fraction > 0.5:
        warnings.append(
            f"warm-up is {100 * plan.warmup_fraction:.0f}% of the run ({plan.warmup_steps:,} of {plan.total_steps:,} "
            "steps): the learning rate spends most of the run below its peak; lower train.warmup_steps or run longer")
    if plan.save_every and plan.save_every >= plan.total_steps:
        warnings.append(
            f"train.save_every={plan.save_every:,} >= the run's {plan.total_steps:,} steps: only the last step is "
            "checkpointed, so a crash loses the whole run; lower train.save_every")
    if plan.steps_per_epoch < 1:
        warnings.append(
            f"one optimizer step takes {plan.micro_batches_per_step} micro-batches but an epoch has only "
            f"{plan.micro_batches_per_epoch}: every step spans several epochs (more data or fewer processes/"
            "accumulation)")
    return warnings


def accumulation_for(tokens_per_step: int, tokens_per_batch: int, world_size: int) -> int:
    """``gradient_accumulation_steps`` that makes an optimizer step ``tokens_per_step`` patch rows (budget) over
    ``world_size`` processes of ``tokens_per_batch``-row micro-batches; refuses a step that does not divide."""
    per_round = tokens_per_batch * world_size
    accumulation = tokens_per_step / per_round
    if tokens_per_step < per_round or not math.isclose(accumulation, round(accumulation)):
        lower = max(1, tokens_per_step // per_round)
        raise ValueError(
            f"data.tokens_per_step={tokens_per_step:,} is not a whole number of rounds of {world_size} process(es) x "
            f"tokens_per_batch={tokens_per_batch:,} = {per_round:,} rows; use {lower * per_round:,} or "
            f"{(lower + 1) * per_round:,}, or change tokens_per_batch")
    return int(round(accumulation))
