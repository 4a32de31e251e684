"""Does the speed code on the prefill path pay? Times Arlow as it is against the same model with that code replaced
by the plain form, interleaved round-robin on the same process and inputs.

* **output_last**: the decoder's last layer computing only the final position at prefill (``logits_to_keep=1``, as
  ``generate`` does) against computing every position.

Ratios ``plain / Arlow`` of the median wall time and of the median process CPU time (> 1: Arlow's code is faster).
The custom autograd rotation this script also timed was removed after its rows in RESULTS.md showed no clear gain.

    python benchmarks/bench_output_last.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_wall_and_cpu, machine_line, markdown_table, median  # noqa: E402

from arlow import ArlowForCausalLM, ArlowTextConfig  # noqa: E402


@contextmanager
def no_output_last(model):
    inner = model.model
    real = inner._output_last
    inner._output_last = lambda *a, **k: None
    try:
        yield
    finally:
        inner._output_last = real


def text_model(args):
    cfg = ArlowTextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=args.depth,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    return ArlowForCausalLM._from_config(cfg, attn_implementation="sdpa")


def output_last_rows(args):
    model = text_model(args).eval()
    rows = []
    for prompt in args.prompts:
        ids = torch.randint(3, 8192, (1, prompt))

        def arlow_prefill():
            with torch.inference_mode():
                model(input_ids=ids, logits_to_keep=1, use_cache=True)

        def plain_prefill():
            with no_output_last(model), torch.inference_mode():
                model(input_ids=ids, logits_to_keep=1, use_cache=True)

        with torch.inference_mode():
            a = model(input_ids=ids, logits_to_keep=1).logits
            with no_output_last(model):
                b = model(input_ids=ids, logits_to_keep=1).logits
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
        wall, cpu = interleaved_wall_and_cpu({"arlow": arlow_prefill, "plain": plain_prefill}, repeats=args.repeats)
        rows.append(["output_last (prefill, fp32)", f"text decoder depth {args.depth}, prompt {prompt}",
                     *_cells(wall, cpu)])
        print(f"  output_last: prompt {prompt}: done", file=sys.stderr)
    return rows


def _cells(wall, cpu):
    a, p = median(wall["arlow"]), median(wall["plain"])
    return [f"{a * 1e3:.0f}", f"{p * 1e3:.0f}", f"{p / a:.2f}x", f"{median(cpu['plain']) / median(cpu['arlow']):.2f}x"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="depth 2, 5 repeats, prompts 128 and 512")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.repeats, args.prompts = 2, 5, [128, 512]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"Machine: {machine_line()}; {torch.get_num_threads()} threads; load average at start "
          f"{os.getloadavg()[0]:.1f}; median of {args.repeats} interleaved runs, fp32\n")
    rows = output_last_rows(args)
    print(markdown_table(["code", "workload", "Arlow ms", "plain ms", "plain / Arlow (wall)", "plain / Arlow (CPU)"],
                         rows))
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
