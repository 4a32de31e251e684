"""MAE training throughput: Arlow's MAE against transformers' ViTMAEForPreTraining, same process, same inputs.

Both models get the same encoder width/depth/heads, the same decoder width/depth/heads, the same number of
patches per image (patch 14 at 224 px = 256 patches) and mask ratio 0.75. Arlow runs with the model card's
features on (locality bias, progressive patches, DeepStack). One training step = forward + backward + AdamW.

Reported per precision: images/s, tokens/s (patches/s), the ratio ours/ViTMAE, MFU against the measured matmul
peak of that dtype (model FLOPs from peers-and-anchors C.1 / ``mae_train_flops``), and peak memory of a training
step measured in a fresh subprocess (VmHWM growth), since CPU PyTorch has no allocator statistics.

    python benchmarks/bench_mae.py                 # ViT-S-like encoder, batch 16, fp32 and bf16
    python benchmarks/bench_mae.py --width 768 --depth 12 --heads 12
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_wall_and_cpu, machine_line, markdown_table, median, mfu  # noqa: E402


def build(which: str, args):
    if which == "arlow":
        from arlow.pretrain.mae import ArlowMAEConfig, ArlowMAEForPreTraining

        cfg = ArlowMAEConfig(
            vision_config=dict(depth=args.depth, embed_dim=args.width, num_heads=args.heads, hidden_size=args.width,
                               use_deformable_attention=True, use_progressive_patches=True),
            decoder_hidden_size=args.dec_width, decoder_num_layers=args.dec_depth, decoder_num_heads=args.dec_heads,
            mask_ratio=0.75)
        cfg.vision_config._attn_implementation = "sdpa"
        return ArlowMAEForPreTraining(cfg)
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                       intermediate_size=4 * args.width, image_size=args.resolution, patch_size=14,
                       decoder_hidden_size=args.dec_width, decoder_num_hidden_layers=args.dec_depth,
                       decoder_num_attention_heads=args.dec_heads, decoder_intermediate_size=4 * args.dec_width,
                       mask_ratio=0.75, norm_pix_loss=True, attn_implementation="sdpa")
    return ViTMAEForPreTraining(cfg)


def inputs(which: str, args, generator):
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=generator)
    if which == "vitmae":
        return {"pixel_values": images}
    from arlow.processing.patches import patchify

    rows, grids = zip(*(patchify(img[None].expand(2, -1, -1, -1), 14, 2, 2) for img in images))
    return {"pixel_values": torch.cat(rows), "grid_thw": torch.stack(grids)}


def vitmae_train_flops(args) -> float:
    """C.1 formula: encoder on 25% of patches + cls, decoder on all patches + cls, x3 for training."""
    n = args.resolution // 14
    T_enc, T_dec = int(n * n * 0.25) + 1, n * n + 1

    def layer(T, D):
        return 8 * T * D**2 + 4 * T * D * 4 * D + 4 * T**2 * D

    enc = args.depth * layer(T_enc, args.width) + 2 * T_enc * 3 * 14 * 14 * args.width
    dec = args.dec_depth * layer(T_dec, args.dec_width) + 2 * T_dec * args.dec_width * 14 * 14 * 3
    dec += 2 * T_enc * args.width * args.dec_width
    return 3 * (enc + dec) * args.batch


def step_fn(model, batch, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def memory_child(which: str, precision: str, steps: int, argv: list[str]) -> int:
    """Peak RSS (bytes) of a fresh process that builds one model and its batch and runs ``steps`` training steps.
    The parent subtracts the ``steps=0`` run, leaving what training itself costs (activations, grads, AdamW)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    model = build(which, args)
    batch = inputs(which, args, torch.Generator().manual_seed(0))
    step = step_fn(model, batch, torch.bfloat16 if precision == "bf16" else torch.float32)
    for _ in range(steps):
        step()
    return _high_water_mark()


def _high_water_mark() -> int:
    """Peak resident memory of this process in bytes (VmHWM; unlike ru_maxrss it is not inherited from the
    parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dec-width", type=int, default=256)
    p.add_argument("--dec-depth", type=int, default=4)
    p.add_argument("--dec-heads", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--memory-child", nargs=3, metavar=("MODEL", "PRECISION", "STEPS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.memory_child:
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = forwarded.index("--memory-child")
        which, precision, steps = args.memory_child
        print(json.dumps(memory_child(which, precision, int(steps), forwarded[:i] + forwarded[i + 4:])))
        return
    torch.set_num_threads(args.threads)
    from arlow.pretrain.mae import mae_train_flops
    from arlow.training.mfu import measure_matmul_peak

    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(machine_line())
    print(f"encoder {args.depth}x{args.width} ({args.heads} heads), decoder {args.dec_depth}x{args.dec_width} "
          f"({args.dec_heads} heads), {args.resolution}px patch 14 ({(args.resolution // 14) ** 2} patches/image), "
          f"batch {args.batch}, mask 0.75\n")
    rows = []
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = measure_matmul_peak(dtype)
        models = {w: build(w, args) for w in ("arlow", "vitmae")}
        batches = {w: inputs(w, args, torch.Generator().manual_seed(0)) for w in models}
        steps = {w: step_fn(models[w], batches[w], dtype) for w in models}
        wall, _ = interleaved_wall_and_cpu(steps, repeats=args.repeats, warmup=1)
        flops = {"arlow": mae_train_flops(models["arlow"].config, batches["arlow"]["grid_thw"]),
                 "vitmae": vitmae_train_flops(args)}
        mem = {}
        for w in models:
            peaks = []
            for steps in (0, 2):
                out = subprocess.run([sys.executable, __file__, *forwarded, "--memory-child", w, precision,
                                      str(steps)], capture_output=True, text=True, check=True)
                peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
            mem[w] = peaks[1] - peaks[0]
        t = {w: median(wall[w]) for w in models}
        patches = args.batch * (args.resolution // 14) ** 2
        for w in models:
            rows.append([precision, w, f"{args.batch / t[w]:.2f}", f"{patches / t[w]:.0f}",
                         f"{t['vitmae'] / t[w]:.2f}x", f"{flops[w] / 1e9:.1f}", mfu(flops[w] / t[w], peak),
                         f"{peak / 1e9:.0f}", f"{mem[w] / 2**20:.0f}"])
    print(markdown_table(["precision", "model", "images/s", "patches/s", "vs ViTMAE", "GFLOP/step", "MFU",
                          "peak GFLOP/s", "train mem MiB"], rows))


if __name__ == "__main__":
    main()
