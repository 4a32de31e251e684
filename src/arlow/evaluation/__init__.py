"""Evaluation of encoders: linear probe, k-NN, reconstructions.

``probe_encoder`` (and ``arlow probe``) scores the frozen features of a vision encoder on a labelled image dataset
with DINO's weighted k-NN and MAE's linear probe; the pieces are importable on their own.
"""

from .datasets import LabelledImages, labelled_images, read_csv, stratified_split
from .features import extract_features, load_encoder, random_encoder
from .knn import knn_accuracy, knn_predict
from .linear_probe import LinearProbe, LinearProbeConfig, probe_accuracy, train_linear_probe
from .probe import probe_encoder, summary_line

__all__ = [
    "LabelledImages", "labelled_images", "read_csv", "stratified_split", "extract_features", "load_encoder",
    "random_encoder", "knn_accuracy", "knn_predict", "LinearProbe", "LinearProbeConfig", "probe_accuracy",
    "train_linear_probe", "probe_encoder", "summary_line",
]
