"""The training engine shared by pretraining and fine-tuning (accelerate loop, precision, checkpoints). It knows no model.

    from arlow.training import TrainConfig, Trainer
    summary = Trainer(TrainConfig(output_dir="runs/x", max_steps=1000), model, data).train()
"""

from .config import TrainConfig, apply_overrides, load_yaml
from .distributed import rank_and_world
from .engine import NonFiniteLossError, Trainer, TrainingInterrupted, TrainingStopped
from .optim import WarmupCosine, build_param_groups

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "TrainingStopped",
    "WarmupCosine",
    "apply_overrides",
    "build_param_groups",
    "load_yaml",
    "rank_and_world",
]
