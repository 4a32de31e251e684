"""Where does Arlow's MAE feature collapse? Effective rank and k-NN accuracy at every encoder stage.

For each variant of the MAE objective (``--variants``, ``ArlowMAEConfig`` fields as ``name:field=value,...``),
pretrain the ``tiny_demo``-shaped encoder on a real digit set held in memory (``mae_lab``), then measure, for the
random initialisation and for the pretrained encoder, at every stage (patch embedding, each block's output before
any merger, each DeepStack merger, the final merger): the effective rank of the per-image mean feature on the
held-out images, and k-NN top-1 (fitted on the training images, scored on the held-out ones).

    python scripts/diagnose_mae_rank.py --set mnist --steps 600 --variants sum:decoder_deepstack_dropout=0 \
        half:decoder_deepstack_dropout=0.5 none:decoder_deepstack_dropout=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mae_lab  # noqa: E402

from arlow.evaluation import effective_rank, knn_accuracy  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        fields[key] = json.loads(value)
    return name, fields


def stage_table(encoder, train_x, train_y, test_x, test_y) -> dict:
    tr, te = mae_lab.layer_features(encoder, train_x), mae_lab.layer_features(encoder, test_x)
    classes = int(train_y.max()) + 1
    return {name: {"rank": effective_rank(te[name]), "knn": knn_accuracy(tr[name], train_y, te[name], test_y, classes)}
            for name in tr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="mnist", choices=mae_lab.SETS)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["sum:decoder_deepstack_dropout=0", "none:decoder_deepstack_dropout=1"])
    parser.add_argument("--output", default="runs/mae-lab/diagnosis.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = mae_lab.load_set(args.set, args.resolution)
    train, held = mae_lab.split(y, 0.2, 0)  # the held-out images are never pretrained on
    shape = mae_lab.Shape(resolution=args.resolution, patch_size=args.patch_size)
    out_path = Path(args.output)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for text in args.variants:
        name, fields = parse_variant(text)
        key = f"{args.set}-{args.steps}-{name}-seed{args.seed}"
        if key in results:
            continue
        torch.manual_seed(args.seed)
        model = mae_lab.arlow_mae(shape, **fields)
        init = stage_table(model.encoder.eval(), x[train], y[train], x[held], y[held])
        start = time.time()
        losses = mae_lab.pretrain(model, x[train], mae_lab.Schedule(steps=args.steps, batch=args.batch, lr=args.lr),
                                  args.seed, log=lambda m: print(f"[{name}] {m}", flush=True))
        trained = stage_table(model.encoder.eval(), x[train], y[train], x[held], y[held])
        results[key] = {"fields": fields, "seconds": time.time() - start, "final_loss": sum(losses[-50:]) / 50,
                        "init": init, "pretrained": trained}
        print(f"\n{key}: loss {results[key]['final_loss']:.4f}, {results[key]['seconds']:.0f} s")
        print(f"{'stage':<12}{'rank init':>10}{'rank MAE':>10}{'kNN init':>10}{'kNN MAE':>10}")
        for stage in init:
            print(f"{stage:<12}{init[stage]['rank']:>10.1f}{trained[stage]['rank']:>10.1f}"
                  f"{100 * init[stage]['knn']:>10.1f}{100 * trained[stage]['knn']:>10.1f}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
