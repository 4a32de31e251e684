"""The margins of issue 13's test: does a short MAE pretraining on digits beat its own random initialisation?

One measurement (:func:`measure`) in the regime of the issue-13 grid (scikit-learn's 8x8 digits at 16 px, patch 4,
encoder 6 x 96, ``mae_lab``'s pretraining loop: AdamW (0.9, 0.95), warm-up + cosine, weight decay 0.05, mask 0.75,
norm-pix loss, 2-pixel translations) for one seed (weights and batches):

* ``rank_random`` / ``rank_pretrained``: effective rank of ``arlow probe``'s default feature (``deepstack``) on the
  evaluation images, for the random initialisation and the pretrained encoder (and at every ``rank_at`` step);
* ``ft_random`` / ``ft_pretrained``: fine-tuning top-1 (encoder + LayerNorm + Linear head end to end on the same
  feature, ``arlow.evaluation.finetune_accuracy``, the same batches for both) on the evaluation images;
* with ``--ft-last-blocks K``, also ``ftK_random`` / ``ftK_pretrained``: MAE's partial fine-tuning (the stem and all
  blocks but the last K frozen; the same recipe and batches).

``--mode select`` pretrains on the fit part of the training split and scores its validation part (choose the recipe
here); ``--mode test`` pretrains on the whole training split and scores the test split (as
``experiment_mae_reference.py``). ``tests/test_mae_pretraining_pays.py`` runs :func:`measure` with the recipe chosen
here. Results are appended to ``OUT/<mode>.jsonl``.

    python scripts/experiment_mae_test_margin.py --mode select --seeds 0 1 2 --steps 600 --lr 3e-3 --rank-at 200 400
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mae_lab  # noqa: E402
from experiment_mae_reference import data_for  # noqa: E402

FEATURE = "deepstack"  # arlow probe's default feature for an encoder with DeepStack levels


def measure(seed: int, mode: str = "select", steps: int = 1000, lr: float = 1.5e-3, batch: int = 128,
            warmup: int = 50, ft_epochs: int = 15, ft_lr: float = 1e-3, rank_at=(), finetune: bool = True,
            ft_last_blocks: int | None = None,
            log=None) -> dict:
    """One seed of the test's protocol (see the module docstring); returns the numbers and the wall times."""
    from arlow.evaluation import effective_rank
    from arlow.evaluation.finetune import FinetuneConfig, finetune_accuracy

    train_x, train_y, eval_x, eval_y = data_for("digits", mode, 16)
    shape = mae_lab.Shape(resolution=16, patch_size=4, depth=6, width=96, heads=2, decoder_width=96)
    torch.manual_seed(seed)
    model = mae_lab.arlow_mae(shape)
    feature = mae_lab.features_fn(FEATURE)

    @torch.no_grad()
    def rank() -> float:
        encoder = mae_lab.encoder_of(model).eval()
        return effective_rank(torch.cat([feature(encoder, eval_x[i:i + 256]) for i in range(0, len(eval_x), 256)]))

    out = {"seed": seed, "mode": mode, "steps": steps, "lr": lr, "batch": batch, "warmup": warmup,
           "ft_epochs": ft_epochs, "ft_lr": ft_lr, "ranks": {0: rank()}}
    initial = copy.deepcopy(mae_lab.encoder_of(model))
    started = time.time()
    losses = mae_lab.pretrain(model, train_x, mae_lab.Schedule(steps=steps, batch=batch, lr=lr, warmup=warmup), seed,
                              log=log, checkpoints=set(rank_at),
                              on_checkpoint=lambda step: out["ranks"].__setitem__(step, rank()))
    out["pretrain_seconds"] = round(time.time() - started, 1)
    out["ranks"][steps] = rank()
    out["rank_random"], out["rank_pretrained"] = out["ranks"][0], out["ranks"][steps]
    out["final_loss"] = sum(losses[-50:]) / len(losses[-50:])
    if finetune:
        config = FinetuneConfig(epochs=ft_epochs, learning_rate=ft_lr, seed=0)
        classes = int(train_y.max()) + 1
        runs = [("ft", config)]
        if ft_last_blocks is not None:
            out["ft_last_blocks"] = ft_last_blocks
            runs.append((f"ft{ft_last_blocks}", dataclasses.replace(config, last_blocks=ft_last_blocks)))
        for tag, cfg in runs:
            for name, encoder in (("random", initial), ("pretrained", mae_lab.encoder_of(model))):
                res = finetune_accuracy(encoder, train_x, train_y, eval_x, eval_y, classes, cfg, features_fn=feature)
                out[f"{tag}_{name}"], out[f"{tag}_{name}_seconds"] = res["top1"], res["seconds"]
            # the margin in images
            out[f"{tag}_images"] = round((out[f"{tag}_pretrained"] - out[f"{tag}_random"]) * len(eval_y))
    out["eval_images"] = len(eval_y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["select", "test"], default="select")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ft-epochs", type=int, default=15)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--rank-at", nargs="*", type=int, default=[])
    parser.add_argument("--no-finetune", action="store_true", help="ranks only (cheap)")
    parser.add_argument("--ft-last-blocks", type=int, default=None, metavar="K",
                        help="also run partial fine-tuning of the last K blocks")
    parser.add_argument("--output", default="runs/mae-margin")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.output) / f"{args.mode}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        res = measure(seed, args.mode, args.steps, args.lr, args.batch, args.warmup, args.ft_epochs, args.ft_lr,
                      args.rank_at, not args.no_finetune, args.ft_last_blocks, log=lambda s: print(s, flush=True))
        print(json.dumps(res), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
