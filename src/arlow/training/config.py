"""`TrainConfig`: every knob of the training engine, loadable from YAML plus dotted ``key=value`` overrides.

Batch arithmetic (written out because it decides the learning rate)::

    micro-batch          one ``next(data)`` on one process (a token budget, not a sample count: design D7)
    optimizer step       gradient_accumulation_steps micro-batches on every process
    effective batch      micro-batch x gradient_accumulation_steps x world_size
    learning_rate        the absolute peak lr; MAE's recipe scales a *base* lr: lr = blr * effective_batch / 256

`learning_rate` is never rescaled by the engine: what you write is what the optimizer uses (see docs/training.md).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import logging
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

logger = logging.getLogger("arlow.training")

PRECISIONS = ("fp32", "bf16", "fp16")
SHIPPED_DEEPSPEED = ("zero2", "zero3")  # names of the DeepSpeed JSONs in arlow/configs/deepspeed/


def shipped_deepspeed_config(name: str) -> Path:
    """Path of a DeepSpeed JSON shipped inside the package (``zero2`` or ``zero3``)."""
    if name not in SHIPPED_DEEPSPEED:
        raise ValueError(f"no shipped DeepSpeed config {name!r}; the shipped ones are {SHIPPED_DEEPSPEED}")
    return Path(str(resources.files("arlow") / "configs" / "deepspeed" / f"{name}.json"))


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run. Field comments say what each one does; all are validated on creation."""

    output_dir: str  # checkpoints, log.jsonl and TensorBoard events go here
    max_steps: int  # optimizer steps to run (skipped non-finite steps count: a step is one window of micro-batches)
    learning_rate: float = 1e-4  # peak lr of every param group that does not set its own "lr"
    weight_decay: float = 0.05  # AdamW decoupled decay on >=2-D params; biases and norm weights (1-D) get 0
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (MAE uses 0.95 for beta2)
    adam_eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warmup: step s < warmup uses lr * (s + 1) / warmup_steps; > max_steps: clamped
    min_lr_ratio: float = 0.0  # cosine decays from lr to min_lr_ratio * lr at max_steps
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step on each process
    max_grad_norm: float | None = 1.0  # clip the global grad norm to this; None or 0 disables clipping
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CPU or GPU) | "fp16" (autocast + dynamic loss scaling, GPU)
    save_every: int = 1000  # checkpoint every N steps (0: only at the end); the last step is always saved
    keep_last: int | None = 3  # keep the newest N checkpoints (None or 0: keep all)
    log_every: int = 10  # one log record (log.jsonl, TensorBoard, progress bar) every N steps
    seed: int = 0  # process i seeds python/numpy/torch with seed + i
    resume: str | None = None  # None: fresh run; "latest": newest complete checkpoint in output_dir (if any); a path
    max_consecutive_nonfinite: int = 5  # stop the run after this many non-finite steps in a row
    deepspeed_config: str | None = None  # DeepSpeed JSON path, or "zero2"/"zero3" (shipped); None: no DeepSpeed
    ddp_find_unused_parameters: bool = False  # DDP only: set when some parameters get no gradient in some steps
    tensorboard: bool = True  # write TensorBoard scalars under output_dir/tensorboard
    progress_bar: bool = True  # tqdm bar on the main process
    peak_flops: float | None = None  # FLOP/s of one device for MFU; None: measured once with a square matmul
    cpu: bool = False  # train on CPU even when a GPU is present
    compile: bool = False  # torch.compile the model's repeated blocks (its _no_split_modules classes) in place
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(hints[f.name], getattr(self, f.name), f.name))
        _check(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        _check(0 < self.learning_rate < math.inf, "learning_rate", self.learning_rate, "a finite float > 0")
        _check(0 <= self.weight_decay < math.inf, "weight_decay", self.weight_decay, "a finite float >= 0")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "betas",
            self.betas,
            "two floats in [0, 1), e.g. [0.9, 0.95]",
        )
        _check(0 < self.adam_eps < math.inf, "adam_eps", self.adam_eps, "a finite float > 0")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        if self.warmup_steps > self.max_steps:
            # A short trial run of a long recipe should just run: the whole run becomes warm-up.
            logger.warning("arlow: warmup_steps=%d exceeds max_steps=%d; warming up over all %d steps (lower "
                           "train.warmup_steps to silence this)", self.warmup_steps, self.max_steps, self.max_steps)
            self.warmup_steps = self.max_steps
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", self.gradient_accumulation_steps, "an integer >= 1")
        _check(self.max_grad_norm is None or 0 <= self.max_grad_norm < math.inf, "max_grad_norm", self.max_grad_norm,
               "a finite float >= 0 or null")
        _check(self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}")
        _check(self.save_every >= 0, "save_every", self.save_every, "an integer >= 0 (0 saves only at the end)")
        _check(self.keep_last is None or self.keep_last >= 0, "keep_last", self.keep_last, "an integer >= 0 or null")
        _check(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        _check(self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", self.max_consecutive_nonfinite, "an integer >= 1")
        _check(self.peak_flops is None or 0 < self.peak_flops < math.inf, "peak_flops", self.peak_flops,
               "a finite float > 0 or null")
        if self.deepspeed_config in SHIPPED_DEEPSPEED:
            self.deepspeed_config = str(shipped_deepspeed_config(self.deepspeed_config))
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ValueError(
                f"deepspeed_config={self.deepspeed_config!r} is not a file; give the path of a DeepSpeed JSON, one of "
                f"the shipped names {SHIPPED_DEEPSPEED}, or null to train without DeepSpeed."
            )

    @property
    def clip_norm(self) -> float | None:
        """The clipping threshold, or None when clipping is off."""
        return self.max_grad_norm if self.max_grad_norm else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a plain mapping (e.g. parsed YAML); strings are coerced to the field types, unknown keys refused."""
        if not isinstance(values, dict):
            raise ValueError(f"a TrainConfig needs a mapping of keys to values, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        check_keys("TrainConfig", values, fields)
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"TrainConfig needs {', '.join(missing)} (no default); add them to the config or overrides.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None, section: str | None = None) -> "TrainConfig":
        """Load ``path`` (the whole file, or its mapping under ``section``), then apply ``key=value`` overrides."""
        tree = load_yaml(path)
        if overrides:
            tree = apply_overrides(tree, overrides)
        if section is not None:
            if section not in tree:
                raise ValueError(f"{path} has no {section!r} section; its top-level keys are {sorted(tree)}.")
            tree = tree[section]
        return cls.from_dict(dict(tree or {}))


def check_keys(section: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Refuse a key of ``section`` (a recipe section such as ``data`` or ``model.vision``) that is not in ``valid``,
    naming the closest valid key: a typo must not silently train the default."""
    valid = list(valid)
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {section} key {key!r}.{hint} Valid keys: {', '.join(valid)}.")


def init_keys(cls: type, *, exclude: Iterable[str] = ()) -> list[str]:
    """The named parameters of ``cls.__init__`` (what a recipe section may set), less ``exclude``."""
    skip = {"self", *exclude}
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected {expected}.")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path} must hold a YAML mapping (key: value lines), got {type(tree).__name__}")
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``tree`` with each ``"a.b.c=value"`` set; values are parsed as YAML ("1e-3" stays a string
    here and becomes a float when the config field is a float). Intermediate mappings are created as needed."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key=value (dotted keys for sections: train.max_steps=100)")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} holds a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Coerce a YAML/override value to the annotated field type, or raise a ValueError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"TrainConfig.{key}={value!r} is invalid")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected a list of {len(args)} values")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected an integer")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected a number") from None
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError(f"TrainConfig.{key}={value!r} is invalid: expected a string")
    return value
