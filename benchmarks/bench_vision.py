"""Vision encoder forward throughput: Arlow vs transformers' Qwen2-VL vision tower, and Arlow's packing strategies.

Same process, same inputs, same depth/width/heads/patch/merge/MLP activation, sdpa, fp32 and bf16, random weights
(throughput does not depend on their values). Timings are interleaved round-robin and reported as medians
because the machine is shared.

    python benchmarks/bench_vision.py            # about 3-4 minutes on 2 cores
    python benchmarks/bench_vision.py --quick    # a smoke run

Table 1 compares against ``Qwen2VisionTransformerPretrainedModel`` on a packed batch of mixed-size images
(the shapes an aspect-preserving processor produces). Table 2 compares Arlow's own ways of splitting a pack into
attention calls (one batched call per distinct item length, one call per item, one call with a block-diagonal
mask) on three packs: the mixed images, an MAE batch (visible windows only, all items the same length) and a
video with a few images.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_wall_and_cpu, machine_line, markdown_table, median, mfu  # noqa: E402
from packing_strategies import STRATEGIES, check, packing  # noqa: E402

from arlow import ArlowVisionConfig, ArlowVLVisionModel  # noqa: E402
from arlow.modeling.kernels.linear import set_onednn_linear  # noqa: E402
from arlow.modeling.vision import vision_forward_flops  # noqa: E402
from arlow.training.mfu import measure_matmul_peak  # noqa: E402

# (t, h, w) patch grids of eight images after an aspect-preserving resize to multiples of 28 px:
# 224x224, 224x336, 336x224, 448x448, 112x560, 280x392, 168x168, 392x280.
MIXED_IMAGES = [(1, 16, 16), (1, 16, 24), (1, 24, 16), (1, 32, 32), (1, 8, 40), (1, 20, 28), (1, 12, 12),
                (1, 28, 20)]


def build_models(depth: int, embed: int, heads: int, dtype: torch.dtype):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    common = dict(depth=depth, embed_dim=embed, hidden_size=2 * embed, num_heads=heads, mlp_ratio=4,
                  hidden_act="gelu_pytorch_tanh", patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                  in_channels=3)
    ours = {}
    for bias in (False, True):
        cfg = ArlowVisionConfig(**common, use_deformable_attention=bias, use_progressive_patches=False,
                                deepstack_visual_indexes=[])
        # bf16: Arlow's blocked CPU attention kernel, chosen explicitly (docs/cpu-inference.md)
        attn = "arlow_blocked_cpu" if dtype == torch.bfloat16 else "sdpa"
        ours[bias] = ArlowVLVisionModel._from_config(cfg, attn_implementation=attn).eval().to(dtype)
    qwen = Qwen2VisionTransformerPretrainedModel._from_config(
        Qwen2VLVisionConfig(**common), attn_implementation="sdpa").eval().to(dtype)
    return ours, qwen


def encoder_flops(grids, config: ArlowVisionConfig) -> float:
    """Model FLOPs of one forward of either encoder on ``grids`` (the same arithmetic in both: patch embedding,
    blocks with attention within each image, 2x2 merger; the benchmark's configs have no DeepStack taps)."""
    return vision_forward_flops(config, [t * h * w for t, h, w in grids])


def random_pack(grids, patch_dim: int, dtype: torch.dtype):
    grid = torch.tensor(grids, dtype=torch.long)
    return torch.randn(int(grid.prod(dim=1).sum()), patch_dim).to(dtype), grid


def without_onednn(run):
    """``run()`` with Arlow's oneDNN linear path off: aten's ``F.linear``, as Qwen2-VL uses."""
    previous = set_onednn_linear(False)
    try:
        return run()
    finally:
        set_onednn_linear(previous)


def versus_qwen(args) -> str:
    rows = []
    labels = {"qwen": "Qwen2-VL vision (transformers)", "ours": "Arlow, no locality bias",
              "ours+bias": "Arlow, locality bias on", "ours-aten": "Arlow, no bias, aten linear (no oneDNN path)"}
    for dtype in (getattr(torch, name) for name in args.dtypes):
        torch.manual_seed(0)
        ours, qwen = build_models(args.depth, args.embed, args.heads, dtype)
        pixels, grid = random_pack(MIXED_IMAGES, ours[False].config.patch_dim, dtype)
        n = pixels.shape[0]
        with torch.inference_mode():
            wall, cpu = interleaved_wall_and_cpu({
                "qwen": lambda: qwen(pixels, grid_thw=grid),
                "ours": lambda: ours[False](pixels, grid),
                "ours+bias": lambda: ours[True](pixels, grid),
                "ours-aten": lambda: without_onednn(lambda: ours[False](pixels, grid)),
            }, repeats=args.repeats)
        q_wall, q_cpu = median(wall["qwen"]), median(cpu["qwen"])
        flops, peak = encoder_flops(MIXED_IMAGES, ours[False].config), measure_matmul_peak(dtype)
        for name, label in labels.items():
            t, c = median(wall[name]), median(cpu[name])
            rows.append([str(dtype).replace("torch.", ""), label, f"{t * 1000:.0f}", f"{n / t:,.0f}",
                         f"{q_wall / t:.2f}x", f"{c:.2f}", f"{q_cpu / c:.2f}x", mfu(flops / t, peak)])
        # What an encoder running every counted FLOP at the measured matmul peak would gain over Qwen2-VL.
        ceiling = f"{q_wall / (flops / peak):.2f}x" if peak >= 1e9 else "n/a"
        rows.append([str(dtype).replace("torch.", ""), "(all model FLOPs at the measured matmul peak)",
                     f"{flops / peak * 1000:.0f}" if peak >= 1e9 else "n/a", "", ceiling, "", "", "100%"])
        print(f"  {dtype}: done ({flops / 1e9:.1f} GFLOP per forward, peak {peak / 1e9:.0f} GFLOP/s)",
              file=sys.stderr)
    return markdown_table(["dtype", "encoder", "median wall ms", "patches/s (wall)", "vs Qwen2-VL (wall)",
                           "median CPU s", "vs Qwen2-VL (CPU)", "MFU"], rows)


def packing_strategies(args) -> str:
    torch.manual_seed(0)
    ours, _ = build_models(args.depth, args.embed, args.heads, torch.float32)
    s = 2
    # MAE batch: 32 images of 224x224 (16x16 patches = 64 windows), 16 visible windows each.
    mae_grid = [(1, 16, 16)] * 32
    mae_positions, mae_lengths = [], []
    from arlow.modeling.rope import vision_patch_positions

    for t, h, w in mae_grid:
        full = vision_patch_positions(torch.tensor([[t, h, w]]), s).view(-1, s * s, 3)
        keep = torch.randperm(full.shape[0])[:16].sort().values
        mae_positions.append(full[keep].reshape(-1, 3))
        mae_lengths.append(16 * s * s)
    packs = {
        "8 mixed-size images": (MIXED_IMAGES, None, None),
        "MAE: 32 x 224px, 25% visible": (mae_grid, torch.cat(mae_positions), torch.tensor(mae_lengths)),
        "video 8 frames 224px + 2 images": ([(4, 16, 16), (1, 16, 16), (1, 24, 16)], None, None),
    }
    rows = []
    for pack_name, (grids, positions, lengths) in packs.items():
        grid = torch.tensor(grids)
        n = int(lengths.sum()) if lengths is not None else int(grid.prod(dim=1).sum())
        pixels = torch.randn(n, ours[False].config.patch_dim)
        for bias in (False, True):
            model = ours[bias]

            def run(strategy, model=model):
                with packing(strategy):
                    return model(pixels, grid, patch_positions=positions, seq_lengths=lengths)

            assert check(model, pixels, grid, patch_positions=positions, seq_lengths=lengths) < 1e-3
            with torch.inference_mode():
                wall, cpu = interleaved_wall_and_cpu({k: (lambda k=k: run(k)) for k in STRATEGIES},
                                                     repeats=max(3, args.repeats - 2))
            base, base_cpu = median(wall["per_item"]), median(cpu["per_item"])
            cells = [f"{median(wall[k]) * 1000:.0f} ms ({base / median(wall[k]):.2f}x; "
                     f"CPU {base_cpu / median(cpu[k]):.2f}x)" for k in STRATEGIES]
            rows.append([pack_name, n, "on" if bias else "off", *cells])
        print(f"  {pack_name}: done", file=sys.stderr)
    return markdown_table(["pack", "patches", "bias", "grouped (default)", "per item", "block-diagonal mask"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="depth 2, 3 repeats")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.quick:
        args.depth, args.repeats = 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Machine: {machine_line()}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"Encoder: depth {args.depth}, embed {args.embed}, {args.heads} heads, patch 14, temporal patch 2, merge 2, "
          f"MLP x4 gelu_pytorch_tanh; sdpa (Arlow bf16: arlow_blocked_cpu); median of {args.repeats} interleaved runs; "
          f"{sum(h * w for _, h, w in MIXED_IMAGES)} patches in {len(MIXED_IMAGES)} images.\n")
    print(versus_qwen(args))
    if not args.skip_packing:
        print("\nPacking strategies (Arlow, fp32, sdpa; median wall time, speed-up vs one call per item in wall and "
              "CPU time):\n")
        print(packing_strategies(args))
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
