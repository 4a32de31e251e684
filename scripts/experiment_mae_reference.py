"""Arlow's MAE against transformers' ``ViTMAEForPreTraining`` and against random initialisation (issue 13).

For every (data set, implementation, pretraining seed): build the model of the shared shape (``mae_lab.Shape``:
``tiny_demo``'s encoder and decoder), pretrain it on the training images (labels unused) with the shared schedule
(same batches, augmentation, AdamW + warm-up + cosine, weight decay, patch count, mask ratio, norm-pix loss), and
at step 0 (= its own random initialisation) and every ``--checkpoints`` step evaluate its encoder with

* k-NN (k = 20, T = 0.07) and the linear probe (BN + Linear) of ``arlow.evaluation`` on the frozen feature,
* fine-tuning (``arlow.evaluation.finetune_accuracy``: encoder + linear head end to end, same budget for every
  encoder),
* the effective rank of the frozen feature.

Raw pixels get the same k-NN and linear probe. Two modes keep model selection honest:

* ``--mode select``: the training split is split again (20 % per class, seed 1) into fit / validation; pretraining
  and probes use the fit part only, scores are validation scores. Choose hyper-parameters here.
* ``--mode test``: pretraining and probes use the whole training split; scores are on the test split (20 % per
  class, seed 0), which ``select`` never touches.

``--jobs N`` runs N (set, implementation, seed, setting) jobs in parallel processes (a GPU machine with many
cores); each job writes ``OUT/<mode>/<job>.json`` after every evaluation, so an interrupted grid keeps what
finished. ``report`` prints the mean ± std tables from those files.

    python scripts/experiment_mae_reference.py run --mode select --sets digits --seeds 0 --lrs 5e-4 1.5e-3
    python scripts/experiment_mae_reference.py run --mode test --sets digits mnist lfw --seeds 0 1 2 --device cuda
    python scripts/experiment_mae_reference.py report --mode test
    python scripts/experiment_mae_reference.py finetune-select --sets digits --ft-grid 15x1e-3 30x1e-3

``finetune-select`` fine-tunes the random initialisations with each EPOCHSxLR recipe on the validation split
(``OUT/select/finetune-recipes.json``). ``--resolution/--patch-size/--depth/--width/--heads`` set the shared
shape (the issue-13 grid: 16 px, patch 4, 6 x 96).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mae_lab  # noqa: E402

IMPLS = ("arlow", "vitmae")


def data_for(name: str, mode: str, resolution: int):
    """``(train_x, train_y, eval_x, eval_y)`` of ``mode`` (see the module docstring)."""
    x, y = mae_lab.load_set(name, resolution)
    train, test = mae_lab.split(y, 0.2, 0)
    if mode == "select":
        fit, val = mae_lab.split(y[train], 0.2, 1)
        train, test = train[fit], train[val]
    return x[train], y[train], x[test], y[test]


def evaluate(encoder, feature: str, train_x, train_y, test_x, test_y, finetune_cfg, device) -> dict:
    """k-NN, linear probe and effective rank of the frozen ``feature`` (Arlow: also of every other pooled feature
    and of every encoder stage), and the fine-tuning accuracy when ``finetune_cfg`` is given."""
    from arlow.evaluation import effective_rank, knn_accuracy, probe_accuracy, train_linear_probe
    from arlow.evaluation.features import FEATURES
    from arlow.evaluation.finetune import finetune_accuracy
    from arlow.evaluation.linear_probe import LinearProbeConfig

    encoder.eval()
    classes = int(train_y.max()) + 1

    @torch.no_grad()
    def feats(fn, x):
        return torch.cat([fn(encoder, x[i:i + 256].to(device)).cpu() for i in range(0, x.shape[0], 256)])

    def frozen(f_train, f_test, probe=True):
        out = {"knn": knn_accuracy(f_train, train_y, f_test, test_y, classes), "rank": effective_rank(f_test)}
        if probe:
            fitted = train_linear_probe(f_train, train_y, classes, LinearProbeConfig(seed=0))
            out["linear"] = probe_accuracy(fitted, f_test, test_y)
        return out

    fn = mae_lab.features_fn(feature)
    result = frozen(feats(fn, train_x), feats(fn, test_x))
    if not hasattr(encoder, "embeddings"):  # Arlow: the other pooled features, and every stage (k-NN + rank)
        result["features"] = {name: frozen(feats(mae_lab.features_fn(name), train_x),
                                           feats(mae_lab.features_fn(name), test_x))
                              for name in FEATURES if name != feature}
        tr, te = mae_lab.layer_features(encoder, train_x), mae_lab.layer_features(encoder, test_x)
        result["stages"] = {name: frozen(tr[name], te[name], probe=False) for name in tr}
    if finetune_cfg is not None:
        result["finetune"] = finetune_accuracy(encoder, train_x, train_y, test_x, test_y, classes, finetune_cfg,
                                               features_fn=fn)["top1"]
    return result


def pixels_baseline(name: str, mode: str, resolution: int) -> dict:
    from arlow.evaluation import knn_accuracy, probe_accuracy, train_linear_probe
    from arlow.evaluation.linear_probe import LinearProbeConfig

    train_x, train_y, test_x, test_y = data_for(name, mode, resolution)
    a, b = train_x[:, 0].flatten(1), test_x[:, 0].flatten(1)
    classes = int(train_y.max()) + 1
    probe = train_linear_probe(a, train_y, classes, LinearProbeConfig(seed=0))
    return {"knn": knn_accuracy(a, train_y, b, test_y, classes), "linear": probe_accuracy(probe, b, test_y)}


def shape_of(job: dict) -> mae_lab.Shape:
    return mae_lab.Shape(resolution=job["resolution"], patch_size=job["patch_size"], mask_ratio=job["mask"],
                         depth=job.get("depth", 6), width=job.get("width", 128), heads=job.get("heads", 2),
                         decoder_width=job.get("width", 128))


def run_job(job: dict) -> dict:
    """One (set, impl, seed, setting): pretrain and evaluate at step 0 and every checkpoint."""
    from arlow.evaluation.finetune import FinetuneConfig, finetune_accuracy

    torch.set_num_threads(job.get("threads", 1))
    out = Path(job["out"])
    result = json.loads(out.read_text()) if out.is_file() else {"job": job, "evals": {}}
    final = str(job["steps"])
    if final in result["evals"]:
        return result
    train_x, train_y, test_x, test_y = data_for(job["set"], job["mode"], job["resolution"])
    shape = shape_of(job)
    torch.manual_seed(job["seed"])
    fields = job.get("fields", {})
    model = mae_lab.arlow_mae(shape, **fields) if job["impl"] == "arlow" else mae_lab.reference_mae(shape)
    device = job["device"]
    model.to(device)
    ft = FinetuneConfig(epochs=job["ft_epochs"], learning_rate=job["ft_lr"], seed=0, batch_size=job.get("ft_batch", 64))
    ft_steps = set(job["finetune_at"])

    def at(step: int) -> None:
        encoder = mae_lab.encoder_of(model)
        started = time.time()
        result["evals"][str(step)] = evaluate(encoder, job["feature"], train_x, train_y, test_x, test_y,
                                              ft if step in ft_steps else None, device)
        result["evals"][str(step)]["eval_seconds"] = round(time.time() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        shown = {k: v for k, v in result["evals"][str(step)].items() if k not in ("features", "stages")}
        print(f"{out.stem} step {step}: {shown}", flush=True)

    initial = copy.deepcopy(mae_lab.encoder_of(model)).cpu()  # fine-tuned after pretraining: results come sooner
    if "0" not in result["evals"]:
        ft_steps.discard(0)
        at(0)
    torch.manual_seed(job["seed"])
    started = time.time()
    losses = mae_lab.pretrain(model, train_x, mae_lab.Schedule(steps=job["steps"], batch=job["batch"], lr=job["lr"],
                                                               weight_decay=0.05, warmup=job["warmup"]),
                              job["seed"], device, checkpoints=set(job["checkpoints"]) | {job["steps"]},
                              on_checkpoint=at)
    result["pretrain_seconds"] = round(time.time() - started, 1)
    if 0 in job["finetune_at"] and "finetune" not in result["evals"]["0"]:
        result["evals"]["0"]["finetune"] = finetune_accuracy(
            initial.to(device), train_x, train_y, test_x, test_y, int(train_y.max()) + 1, ft,
            features_fn=mae_lab.features_fn(job["feature"]))["top1"]
    result["loss_curve"] = [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def jobs_from(args) -> list[dict]:
    jobs = []
    for name, impl, seed, lr, mask in itertools.product(args.sets, args.impls, args.seeds, args.lrs, args.masks):
        tag = (f"{name}-{impl}-r{args.resolution}p{args.patch_size}d{args.depth}w{args.width}-lr{lr:g}-mask{mask:g}"
               f"-ft{args.ft_epochs}x{args.ft_lr:g}-{args.steps}steps-seed{seed}")
        if args.variant:
            tag += f"-{args.variant}"
        jobs.append({"set": name, "impl": impl, "seed": seed, "lr": lr, "mask": mask, "mode": args.mode,
                     "steps": args.steps, "batch": args.batch, "warmup": args.warmup, "resolution": args.resolution,
                     "patch_size": args.patch_size, "depth": args.depth, "width": args.width,
                     "heads": args.heads, "ft_batch": args.ft_batch, "feature": args.feature, "device": args.device,
                     "checkpoints": args.checkpoints, "finetune_at": args.finetune_at or [0, args.steps],
                     "ft_epochs": args.ft_epochs, "ft_lr": args.ft_lr, "threads": args.threads,
                     "fields": {k: json.loads(v) for k, v in (kv.split("=") for kv in args.fields)}
                     if impl == "arlow" else {},
                     "out": str(Path(args.output) / args.mode / f"{tag}.json")})
    return jobs


def finetune_select(args) -> None:
    """Choose the fine-tuning recipe on the validation split: every (epochs, lr) of ``--ft-grid`` applied to the
    random initialisation (seed 0) of each implementation; the recipe must let an untrained encoder reach its
    potential before "pretrained beats random on fine-tuning" means anything."""
    from arlow.evaluation.finetune import FinetuneConfig, finetune_accuracy

    torch.set_num_threads(args.threads)
    out = Path(args.output) / "select" / "finetune-recipes.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name, impl in itertools.product(args.sets, args.impls):
        train_x, train_y, val_x, val_y = data_for(name, "select", args.resolution)
        job = {"resolution": args.resolution, "patch_size": args.patch_size, "mask": args.masks[0],
               "depth": args.depth, "width": args.width, "heads": args.heads}
        for item in args.ft_grid:
            epochs, lr = item.split("x")
            key = f"{name}-{impl}-r{args.resolution}p{args.patch_size}d{args.depth}w{args.width}-ft{epochs}x{lr}"
            if key in results:
                continue
            torch.manual_seed(0)
            model = mae_lab.arlow_mae(shape_of(job)) if impl == "arlow" else mae_lab.reference_mae(shape_of(job))
            res = finetune_accuracy(mae_lab.encoder_of(model), train_x, train_y, val_x, val_y, int(train_y.max()) + 1,
                                    FinetuneConfig(epochs=int(epochs), learning_rate=float(lr), seed=0,
                                                   batch_size=args.ft_batch),
                                    features_fn=mae_lab.features_fn(args.feature))
            results[key] = {"val_top1": res["top1"], "train_top1": res["train_top1"], "seconds": res["seconds"]}
            print(key, results[key], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")


def report(args) -> None:
    """Mean ± std over seeds per (set, impl, setting), at the final step, against step 0 and raw pixels."""
    folder = Path(args.output) / args.mode
    groups: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("pixels"):
            continue
        data = json.loads(path.read_text())
        if "evals" not in data:  # finetune-recipes.json
            continue
        key = re.sub(r"-seed\d+", "", path.stem)
        groups.setdefault(key, []).append(data)
    protocols = ("knn", "linear", "finetune", "rank")

    def cell(values, rank=False):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        scale = 1 if rank else 100
        return f"{scale * np.mean(values):.1f} ± {scale * np.std(values):.1f}"

    print(f"| job (set-impl-settings) | seeds | step | " + " | ".join(protocols) + " |")
    print("|---|---|---|" + "---|" * len(protocols))
    for key, runs in groups.items():
        steps = sorted({int(s) for r in runs for s in r["evals"]})
        for step in steps:
            rows = [r["evals"].get(str(step)) for r in runs]
            rows = [r for r in rows if r]
            print(f"| {key} | {len(rows)} | {step} | " +
                  " | ".join(cell([r.get(p) for r in rows], p == "rank") for p in protocols) + " |")
    pixels = folder / "pixels.json"
    if pixels.is_file():
        for name, res in json.loads(pixels.read_text()).items():
            print(f"| {name} raw pixels | - | - | {100 * res['knn']:.1f} | {100 * res['linear']:.1f} | - | - |")
    print()
    print("Pretrained (last step) against the same seeds' random initialisation (step 0); "
          "delta = paired difference, mean ± std over seeds (points; rank: absolute)")
    print("| job | seeds | protocol | random init | pretrained | delta |")
    print("|---|---|---|---|---|---|")
    for key, runs in groups.items():
        done = [r for r in runs if str(r["job"]["steps"]) in r["evals"] and "0" in r["evals"]]
        if not done:
            continue
        for p in protocols:
            pairs = [(r["evals"]["0"].get(p), r["evals"][str(r["job"]["steps"])].get(p)) for r in done]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                continue
            rank = p == "rank"
            print(f"| {key} | {len(pairs)} | {p} | {cell([a for a, _ in pairs], rank)} | "
                  f"{cell([b for _, b in pairs], rank)} | {cell([b - a for a, b in pairs], rank)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "report", "finetune-select"])
    parser.add_argument("--mode", choices=["select", "test"], default="select")
    parser.add_argument("--sets", nargs="+", default=list(mae_lab.SETS), choices=mae_lab.SETS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1.5e-3])
    parser.add_argument("--masks", nargs="+", type=float, default=[0.75])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoints", nargs="*", type=int, default=[250, 500, 1000])
    parser.add_argument("--finetune-at", nargs="*", type=int, default=None, help="steps fine-tuned (default 0, last)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--feature", default="merged", help="Arlow's pooled feature (arlow.evaluation.FEATURES)")
    parser.add_argument("--fields", nargs="*", default=[], help="ArlowMAEConfig overrides, field=value")
    parser.add_argument("--variant", default="", help="tag appended to the job names (with --fields)")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128, help="encoder and decoder width (Arlow: embed_dim)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--ft-batch", type=int, default=64)
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--ft-grid", nargs="*", default=["10x5e-4", "10x1e-3", "20x1e-3"],
                        help="finetune-select: EPOCHSxLR recipes tried on random init")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--output", default="runs/mae-ref")
    args = parser.parse_args()
    if args.stage == "report":
        report(args)
        return
    if args.stage == "finetune-select":
        finetune_select(args)
        return
    pixels = Path(args.output) / args.mode / "pixels.json"
    baselines = json.loads(pixels.read_text()) if pixels.is_file() else {}
    if any(n not in baselines for n in args.sets):
        baselines.update({n: pixels_baseline(n, args.mode, args.resolution) for n in args.sets if n not in baselines})
        pixels.parent.mkdir(parents=True, exist_ok=True)
        pixels.write_text(json.dumps(baselines) + "\n")
    jobs = jobs_from(args)
    if args.jobs == 1:
        for job in jobs:
            run_job(job)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for _ in pool.imap_unordered(run_job, jobs):
                pass


if __name__ == "__main__":
    main()
