"""Evaluation of encoders: k-NN, linear probe, fine-tuning, effective rank.

``probe_encoder`` (and ``arlow probe``) scores the frozen features of a vision encoder on a labelled image dataset
with DINO's weighted k-NN and MAE's linear probe, reports the features' effective rank, and optionally fine-tunes
the encoder with a linear head (MAE's main protocol); the pieces are importable on their own.
"""

from .datasets import LabelledImages, labelled_images, read_csv, stratified_split
from .features import extract_features, load_encoder, random_encoder
from .finetune import FinetuneConfig, finetune_accuracy, freeze_all_but_last_blocks
from .knn import knn_accuracy, knn_predict
from .linear_probe import LinearProbe, LinearProbeConfig, probe_accuracy, train_linear_probe
from .probe import probe_encoder, summary_line
from .rank import effective_rank

__all__ = [
    "LabelledImages", "labelled_images", "read_csv", "stratified_split", "extract_features", "load_encoder",
    "random_encoder", "knn_accuracy", "knn_predict", "LinearProbe", "LinearProbeConfig", "probe_accuracy",
    "train_linear_probe", "probe_encoder", "summary_line", "effective_rank", "FinetuneConfig", "finetune_accuracy",
    "freeze_all_but_last_blocks",
]
