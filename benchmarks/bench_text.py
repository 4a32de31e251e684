"""Prefill and greedy-decode throughput of ArlowForCausalLM against transformers' Qwen3ForCausalLM (CPU, sdpa).

Both models have the same shapes and the same weights: a random Qwen3 model is saved, converted with
``arlow.modeling.convert_llm`` (Qwen3's q/k-norm -> ``use_qk_norm=True``) and loaded, so the comparison is like for
like: in fp32 both give bitwise-identical logits, so any speed difference is the implementation's. Runs are
interleaved round-robin (rotated order) and repeated because the machine is shared; the table reports medians and
the ratio Arlow / Qwen3 of wall-clock throughput, and, as a second opinion that other processes disturb less, the
same ratio computed from the process CPU time of each call.

* prefill tokens/s = B * prompt / time of one forward that fills a fresh cache (``logits_to_keep=1``, as generate).
* decode tokens/s  = B * new / (time of ``generate(max_new_tokens=1 + new)`` - time of ``generate(max_new_tokens=1)``),
  greedy, ``min_new_tokens`` forcing the length, so it includes generate's own per-step overhead.

    python benchmarks/bench_text.py                 # hidden 512, 8 layers, prompt 128, 32 new tokens, 5 repeats
    python benchmarks/bench_text.py --reps 7 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import machine_line, markdown_table, median
from transformers import Qwen3Config, Qwen3ForCausalLM

import arlow  # noqa: F401
from arlow.modeling.kernels.linear import pack_weights
from arlow import ArlowForCausalLM
from arlow.modeling.convert_llm import convert_llm


def build_pair(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.kv_heads,
        head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    qwen = Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with tempfile.TemporaryDirectory() as tmp:
        qwen.save_pretrained(Path(tmp) / "qwen3")
        convert_llm(Path(tmp) / "qwen3", Path(tmp) / "arlow")
        ours = ArlowForCausalLM.from_pretrained(Path(tmp) / "arlow", attn_implementation="sdpa").eval()
    return ours, qwen


def interleaved_clocks(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, list]]:
    """Wall-clock and process-CPU seconds of every call, candidates run round-robin in rotated order."""
    names = list(candidates)
    for name in names:  # warm-up: allocator, kernels, caches
        candidates[name]()
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def prefill(model, ids) -> None:
    with torch.inference_mode():
        model(ids, use_cache=True, logits_to_keep=1)


def generate(model, ids, new: int) -> None:
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--packed", action="store_true",
                        help="Arlow with oneDNN-packed weights (arlow.modeling.kernels.linear.pack_weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ours32, qwen32 = build_pair(args)
    if args.packed:
        pack_weights(ours32)  # re-packed after each .to(dtype): the pack follows the weight
    print(f"# {machine_line()}; hidden {args.hidden}, {args.layers} layers, heads {args.hidden // 64}/"
          f"{args.kv_heads}, head_dim 64, vocab {args.vocab}, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.reps} interleaved reps, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {"arlow": ours32.to(dtype), "qwen3": qwen32.to(dtype)}
        for batch in args.batches:
            ids = torch.randint(3, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():  # same weights: same greedy tokens, and how far the logits are apart
                outs = [m(ids).logits.float() for m in models.values()]
                gens = [m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in models.values()]
            same = torch.equal(gens[0], gens[1])
            diff = (outs[0] - outs[1]).abs().max().item()
            candidates = {}
            for name, model in models.items():
                candidates[f"{name} prefill"] = partial(prefill, model, ids)
                candidates[f"{name} gen1"] = partial(generate, model, ids, 1)
                candidates[f"{name} genN"] = partial(generate, model, ids, 1 + args.new)
            measured = interleaved_clocks(candidates, args.reps)
            rate = {}
            for clock in ("wall", "cpu"):
                t = {k: median(v[clock]) for k, v in measured.items()}
                for name in models:
                    rate[clock, name, "prefill"] = batch * args.prompt / t[f"{name} prefill"]
                    rate[clock, name, "decode"] = batch * args.new / max(t[f"{name} genN"] - t[f"{name} gen1"], 1e-9)
            for phase in ("prefill", "decode"):
                a, q = rate["wall", "arlow", phase], rate["wall", "qwen3", phase]
                cpu_ratio = rate["cpu", "arlow", phase] / rate["cpu", "qwen3", phase]
                rows.append([phase, batch, dtype_name, f"{a:,.1f}", f"{q:,.1f}", f"{a / q:.2f}x", f"{cpu_ratio:.2f}x",
                             f"{'yes' if same else 'no'} ({diff:.1e})"])
                print(f"{phase:7s} B={batch} {dtype_name:8s} arlow {a:9.1f} tok/s  qwen3 {q:9.1f} tok/s  "
                      f"ratio {a / q:.2f} (cpu time {cpu_ratio:.2f})  same tokens {same}, max logit diff {diff:.1e}",
                      file=sys.stderr, flush=True)
    print(markdown_table(["phase", "batch", "dtype", "Arlow tok/s", "Qwen3 tok/s", "Arlow / Qwen3 (wall)",
                          "Arlow / Qwen3 (CPU time)", "same greedy tokens (max logit diff)"], rows))


if __name__ == "__main__":
    main()
