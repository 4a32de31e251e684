"""``arlow probe``: frozen-feature evaluation of a vision encoder (k-NN and linear probe) on labelled images.

::

    arlow probe runs/pretrain-demo/checkpoint-400 --dataset digits/ --resolution 224
    arlow probe --random-init tiny_demo --dataset digits/ --resolution 112        # the same architecture, untrained
    arlow probe ENCODER --train data/train --test data/test --feature deepstack --output probe.json

The encoder is an exported ``vision_encoder/``, a pretraining ``checkpoint-N/`` or a random initialisation of a
config/recipe (``--random-init``). The dataset is a class-folder tree, a saved ``datasets`` folder or a CSV of
``path,label`` (:mod:`arlow.evaluation.datasets`), split with a seeded stratified split or given as two splits.
Features: :mod:`arlow.evaluation.features`; k-NN: :mod:`arlow.evaluation.knn` (DINO's weighted vote); linear
probe: :mod:`arlow.evaluation.linear_probe` (MAE's BatchNorm + Linear). Writes a JSON result file and prints a
one-line summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .datasets import class_index, labelled_images, stratified_split
from .features import default_feature, extract_features, image_pixels, load_encoder, pooled_features, random_encoder
from .finetune import FinetuneConfig, finetune_accuracy
from .knn import knn_accuracy
from .linear_probe import LinearProbeConfig, probe_accuracy, train_linear_probe
from .rank import effective_rank

__all__ = ["probe_encoder", "summary_line", "run"]


def probe_encoder(encoder=None, *, random_init: str | None = None, init_seed: int = 0, dataset=None, train=None,
                  test=None, resolution: int = 224, test_fraction: float = 0.2, seed: int = 0,
                  feature: str | None = None, k: int = 20, temperature: float = 0.07,
                  linear: LinearProbeConfig | None = None, batch_size: int = 64, image_column: str = "image",
                  label_column: str = "label", split: str = "train", test_split: str = "test",
                  output=None, progress: bool = True, finetune: FinetuneConfig | None = None) -> dict:
    """Evaluate frozen features of an encoder; returns (and with ``output`` writes) the result dict.

    Args:
        encoder: an ``ArlowVLVisionModel``, or the path of an exported ``vision_encoder/`` or a ``checkpoint-N/``.
        random_init: instead of ``encoder``, a config JSON or recipe to initialise randomly (seed ``init_seed``).
        dataset: one labelled dataset, split ``1 - test_fraction`` / ``test_fraction`` per class with ``seed``.
        train, test: two labelled datasets instead of ``dataset`` (``split``/``test_split`` pick the splits of a
            saved ``DatasetDict``).
        resolution: square side in pixels, a multiple of ``patch_size * spatial_merge_size`` (28).
        feature: which pooled feature (:data:`arlow.evaluation.features.FEATURES`; see docs/evaluation.md); ``None``
            (the default): ``"deepstack"`` for an encoder with DeepStack levels, else ``"merged"``
            (:func:`arlow.evaluation.features.default_feature`).
        k, temperature: the k-NN vote. linear: the linear probe's settings (its ``seed`` defaults to ``seed``).
        batch_size: images per encoder call during feature extraction.
        finetune: also run the fine-tuning protocol (:func:`arlow.evaluation.finetune_accuracy`: a copy of the
            encoder + a linear head on ``feature``, trained end to end on the training split) with these settings.
    Returns:
        ``{"knn": {"top1", ...}, "linear": {"top1", "train_top1", ...}, "feature_rank", "num_train", ...}``
        (``feature_rank``: effective rank of the test features, :func:`arlow.evaluation.effective_rank`).
    """
    started = time.time()
    if (encoder is None) == (random_init is None):
        raise ValueError("give exactly one of an ENCODER folder (encoder=) and --random-init CONFIG.json|RECIPE "
                         "(random_init=)")
    if (dataset is None) == (train is None and test is None) or (train is None) != (test is None):
        raise ValueError("give either --dataset (dataset=, split with --seed) or both --train and --test (train=, "
                         "test=: given splits)")
    if random_init is not None:
        model, described = random_encoder(random_init, init_seed)
    elif isinstance(encoder, (str, Path)):
        model, described = load_encoder(encoder)
    else:
        model, described = encoder.eval(), type(encoder).__name__
    feature = default_feature(model.config) if feature is None else feature

    if dataset is not None:
        full = labelled_images(dataset, image_column, label_column, split)
        class_index(full)  # one class / empty: fail before splitting or extracting anything
        train_pos, test_pos = stratified_split(full.names, test_fraction, seed)
        train_set, test_set = full.select(train_pos), full.select(test_pos)
        split_note = f"seeded stratified split of {full.where}: test fraction {test_fraction}, seed {seed}"
    else:
        train_set = labelled_images(train, image_column, label_column, split)
        test_set = labelled_images(test, image_column, label_column, test_split)
        class_index(train_set, test_set)
        split_note = f"given splits: train {train_set.where}, test {test_set.where}"

    extracted = time.time()
    train_feats = extract_features(model, train_set, resolution, batch_size, feature, progress, "train features")
    test_feats = extract_features(model, test_set, resolution, batch_size, feature, progress, "test features")
    extracted = time.time() - extracted
    train_set, test_set = train_set.select(train_feats.kept), test_set.select(test_feats.kept)
    classes, y_train, y_test = class_index(train_set, test_set)  # again: skipped images may remove a class
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)

    knn_top1 = knn_accuracy(train_feats.features, y_train, test_feats.features, y_test, len(classes), k, temperature)
    linear = linear or LinearProbeConfig(seed=seed)
    fitted = time.time()
    probe = train_linear_probe(train_feats.features, y_train, len(classes), linear)
    fitted = time.time() - fitted
    skipped = train_feats.skipped + test_feats.skipped
    result = {
        "encoder": described,
        "split": split_note,
        "num_train": len(train_set), "num_test": len(test_set), "num_classes": len(classes),
        "classes": classes[:100],
        "num_skipped": len(skipped), "skipped": [{"file": f, "reason": r} for f, r in skipped[:50]],
        "resolution": resolution, "feature": feature, "feature_dim": int(train_feats.features.shape[1]),
        "feature_rank": effective_rank(test_feats.features) if len(test_set) > 1 else None,
        "knn": {"k": k, "temperature": temperature, "top1": knn_top1},
        "linear": {"epochs": linear.epochs, "batch_size": linear.batch_size, "learning_rate": linear.learning_rate,
                   "momentum": linear.momentum, "weight_decay": linear.weight_decay, "seed": linear.seed,
                   "top1": probe_accuracy(probe, test_feats.features, y_test),
                   "train_top1": probe_accuracy(probe, train_feats.features, y_train)},
        "seconds": {"features": round(extracted, 2), "linear_probe": round(fitted, 2),
                    "total": round(time.time() - started, 2)},
    }
    if finetune is not None:
        tuned = finetune_accuracy(model, image_pixels(train_set, resolution), y_train,
                                  image_pixels(test_set, resolution), y_test, len(classes), finetune,
                                  features_fn=lambda encoder, pixels: pooled_features(encoder, pixels, feature))
        result["finetune"] = {**tuned["config"], "top1": tuned["top1"], "train_top1": tuned["train_top1"],
                              "trainable_parameters": tuned["trainable_parameters"]}
        result["seconds"]["finetune"] = tuned["seconds"]
        result["seconds"]["total"] = round(time.time() - started, 2)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_line(result: dict) -> str:
    """``probe: k-NN (k=20) top-1 93.10% | linear top-1 95.20% | 4000 train / 1000 test, 10 classes, merged dim 256
    (effective rank 41.3) | ENCODER``"""
    skipped = f", {result['num_skipped']} skipped" if result["num_skipped"] else ""
    rank = f" (effective rank {result['feature_rank']:.1f})" if result.get("feature_rank") is not None else ""
    tuned = ""
    if "finetune" in result:
        last = result["finetune"].get("last_blocks")
        how = "fine-tuned" if last is None else f"last {last} blocks fine-tuned"
        tuned = f" | {how} top-1 {100 * result['finetune']['top1']:.2f}%"
    return (f"probe: k-NN (k={result['knn']['k']}) top-1 {100 * result['knn']['top1']:.2f}% | linear top-1 "
            f"{100 * result['linear']['top1']:.2f}%{tuned} | {result['num_train']} train / {result['num_test']} test, "
            f"{result['num_classes']} classes, {result['feature']} dim {result['feature_dim']}{rank}{skipped} | "
            f"{result['encoder']}")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.finetune_last_blocks is not None and not args.finetune:
        raise ValueError("--finetune-last-blocks sets how the fine-tuning protocol runs: add --finetune")
    given = dict(epochs=args.epochs, batch_size=args.probe_batch_size, learning_rate=args.lr)
    linear = LinearProbeConfig(**{k: v for k, v in given.items() if v is not None}, seed=args.seed)
    tuned = dict(epochs=args.finetune_epochs, learning_rate=args.finetune_lr, batch_size=args.finetune_batch_size,
                 last_blocks=args.finetune_last_blocks)
    result = probe_encoder(
        args.encoder, random_init=args.random_init, init_seed=args.init_seed, dataset=args.dataset,
        train=args.train, test=args.test, resolution=args.resolution, test_fraction=args.test_fraction,
        seed=args.seed, feature="deepstack" if args.deepstack else args.feature, k=args.k,
        temperature=args.temperature, linear=linear,
        batch_size=args.batch_size, image_column=args.image_column, label_column=args.label_column,
        split=args.split, test_split=args.test_split, output=args.output, progress=not args.no_progress,
        finetune=FinetuneConfig(**{k: v for k, v in tuned.items() if v is not None}, seed=args.seed)
        if args.finetune else None)
    print(summary_line(result))
    print(f"results written to {args.output}")
    return 0
