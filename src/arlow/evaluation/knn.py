"""Weighted k-nearest-neighbour classification of frozen features, as in DINO's ``eval_knn``.

Features are L2-normalised, so the dot product is the cosine similarity. Each test item takes its ``k`` most
similar training items; neighbour ``j`` votes for its class with weight ``exp(sim_j / temperature)``; the class
with the largest total wins. Everything is a pure function of its inputs (no randomness).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_accuracy"]


def _check(train_features, train_labels, test_features, num_classes, k, temperature):
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (n_train, D) and (n_test, D) with the same D, got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must be ({train_features.shape[0]},), got {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training feature")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_classes < 1 or int(train_labels.max()) >= num_classes or int(train_labels.min()) < 0:
        raise ValueError(f"train_labels must lie in [0, num_classes={num_classes})")


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Class scores of the test items.

    Args:
        train_features: ``(n_train, D)``; test_features: ``(n_test, D)`` (any scale: they are L2-normalised here).
        train_labels: ``(n_train,)`` integer classes in ``[0, num_classes)``.
        k: neighbours (capped at ``n_train``); temperature: softness of the vote weights.
        chunk_size: test items per similarity block (bounds memory at ``chunk_size * n_train`` floats).
    Returns:
        ``(n_test, num_classes)`` summed vote weights; ``argmax(-1)`` is the prediction.
    """
    _check(train_features, train_labels, test_features, num_classes, k, temperature)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start:start + chunk_size] @ train.T  # (c, n_train)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (c, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(top_sim.shape[0], num_classes)
        votes.scatter_add_(1, labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on the test items."""
    if test_labels.shape != (test_features.shape[0],) or test_features.shape[0] == 0:
        raise ValueError(f"need one label per test item and at least one test item, got {tuple(test_labels.shape)} "
                         f"labels for {test_features.shape[0]} items")
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return float((scores.argmax(dim=1) == test_labels.long()).float().mean())
