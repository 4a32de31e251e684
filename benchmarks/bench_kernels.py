"""The CPU kernels behind ``arlow.modeling.kernels.linear`` and the vision encoder's bf16 attention, timed against PyTorch's.

Table 1: a linear layer (``x (M, in) @ W.T + b``) through aten's ``F.linear``, through oneDNN as Arlow calls it, and
through oneDNN with the weight packed (``arlow.pack_weights``), at the shapes of a decode step (M = 1, 8), a prefill
(M = 128) and the vision encoder (M = 3632); with a following GELU for the vision MLP's ``fc1``.
Table 2: attention of one item (``(n, H, L, 64)``) through ``F.scaled_dot_product_attention`` and through
``arlow.modeling.kernels.blocked_attention``, bf16, at the item lengths of the vision benchmark's images and of a
clip, with 8 heads and with the published encoder's 24 (``--heads``).

Median of interleaved repeats; ratios are what to read (the machines are shared).

    python benchmarks/bench_kernels.py               # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, markdown_table, median  # noqa: E402

from arlow.modeling.kernels.linear import onednn_linear, onednn_supports  # noqa: E402
from arlow.modeling.kernels.blocked_attention import blocked_attention  # noqa: E402

LINEAR_SHAPES = [  # (name, out, in)
    ("lm_head 32000x512", 32000, 512), ("qkv 1536x512", 1536, 512), ("fc1 2048x512", 2048, 512),
    ("fc2 512x2048", 512, 2048),
]
# (items of this length, L): the vision benchmark's images, a 448x448 image, and a 4-slice clip of 448x448 frames
ATTENTION_ITEMS = [(1, 144), (1, 256), (2, 384), (2, 560), (1, 1024), (1, 4096)]


def clock(fn, repeats: int) -> float:
    """Median seconds per call (each timing runs enough calls for ~20 ms)."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return median(times)


def linear_table(args) -> str:
    rows = []
    gelu = torch.nn.GELU(approximate="tanh")
    for dtype in (getattr(torch, name) for name in args.dtypes):
        if not onednn_supports(dtype):
            print(f"  {dtype}: no oneDNN kernels on this CPU, skipped", file=sys.stderr)
            continue
        for name, n_out, n_in in LINEAR_SHAPES:
            weight = (torch.randn(n_out, n_in) * 0.05).to(dtype)
            bias = torch.randn(n_out).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 128)
            for m in args.rows:
                if name.startswith("lm_head") and m > 128:
                    continue  # the lm_head sees few rows (logits_to_keep)
                x = torch.randn(m, n_in).to(dtype)
                with torch.inference_mode():
                    t_aten = clock(lambda: F.linear(x, weight, bias), args.repeats)
                    t_dnn = clock(lambda: onednn_linear(x, weight, bias), args.repeats)
                    t_packed = clock(lambda: onednn_linear(x, packed, bias), args.repeats)
                    cells = ["", ""]
                    if name.startswith("fc1"):
                        t_aten_g = clock(lambda: gelu(F.linear(x, weight, bias)), args.repeats)
                        t_fused = clock(lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [],
                                                                                  "tanh"), args.repeats)
                        cells = [f"{t_aten_g * 1e3:.3f} / {t_fused * 1e3:.3f}", f"{t_aten_g / t_fused:.2f}x"]
                rows.append([str(dtype).replace("torch.", ""), name, m, f"{t_aten * 1e3:.3f}", f"{t_dnn * 1e3:.3f}",
                             f"{t_packed * 1e3:.3f}", f"{t_aten / t_dnn:.2f}x", f"{t_aten / t_packed:.2f}x", *cells])
            print(f"  {dtype} {name}: done", file=sys.stderr)
    return markdown_table(["dtype", "layer", "rows M", "aten ms", "oneDNN ms", "oneDNN packed ms",
                           "oneDNN vs aten", "packed vs aten", "+GELU: aten / fused ms", "fused vs aten"], rows)


def attention_table(args) -> str:
    rows = []
    for heads in args.heads:
        for count, length in ATTENTION_ITEMS:
            q, k, v = (torch.randn(count, heads, length, 64).bfloat16() for _ in range(3))
            with torch.inference_mode():
                t_fused = clock(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
                t_blocked = clock(lambda: blocked_attention(None, q, k, v, None, scaling=0.125), args.repeats)
                exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
                err_fused = (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).double() - exact).abs().max()
                err_blocked = (blocked_attention(None, q, k, v, None, scaling=0.125)[0].double() - exact).abs().max()
            flops = 4 * count * heads * length**2 * 64
            rows.append([heads, f"{count} x {length}", f"{t_fused * 1e3:.2f}", f"{t_blocked * 1e3:.2f}",
                         f"{t_fused / t_blocked:.2f}x", f"{flops / t_blocked / 1e9:.0f}", f"{err_fused:.1e}",
                         f"{err_blocked:.1e}"])
    return markdown_table(["heads of 64", "items x L", "fused SDPA ms", "blocked ms", "blocked vs fused",
                           "blocked GFLOP/s", "fused max error", "blocked max error"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128, 3632])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--heads", type=int, nargs="+", default=[8, 24], help="attention heads (table 2)")
    parser.add_argument("--skip-linear", action="store_true", help="only table 2")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Machine: {machine_line()}; load average at start {os.getloadavg()[0]:.1f}\n")
    if not args.skip_linear:
        print(linear_table(args))
        print()
    if onednn_supports(torch.bfloat16):
        print(attention_table(args))
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
