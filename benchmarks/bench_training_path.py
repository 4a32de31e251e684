"""Does the speed code on the training and prefill paths pay? Each row times Arlow as it is against the same model
with that code replaced by the plain form, interleaved round-robin on the same process and inputs.

* **rotation**: ``arlow.modeling.rope``'s custom autograd rotation (``_Rotation``: one fp32 buffer forward, the
  rotation by minus the angle backward) against autograd through the plain ``x * cos + rotate_half(x) * sin`` (fp32).
  Timed as a training step (forward + backward + nothing else) of the vision encoder on a pack of mixed-size images
  and of the text decoder on a batch of sequences.
* **output_last**: the decoder's last layer computing only the final position at prefill (``logits_to_keep=1``, as
  ``generate`` does) against computing every position.

Ratios ``plain / arlow`` of the median wall time and of the median process CPU time (> 1: Arlow's code is faster).

    python benchmarks/bench_training_path.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_wall_and_cpu, machine_line, markdown_table, median  # noqa: E402

import arlow.modeling.rope as rope  # noqa: E402
from arlow import ArlowForCausalLM, ArlowTextConfig, ArlowVisionConfig, ArlowVLVisionModel  # noqa: E402

MIXED_IMAGES = [(1, 16, 16), (1, 16, 24), (1, 24, 16), (1, 32, 32), (1, 8, 40), (1, 20, 28)]


def _plain_rotation(x, cos, sin):
    """Autograd through the textbook formula, in fp32; half-width tables are widened to the half-split layout."""
    if cos.shape[-1] != x.shape[-1]:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    return (xf * cos.to(dtype) + rope.rotate_half(xf) * sin.to(dtype)).to(x.dtype)


@contextmanager
def plain_rotation():
    real = rope._Rotation.apply
    rope._Rotation.apply = _plain_rotation
    try:
        yield
    finally:
        rope._Rotation.apply = real


@contextmanager
def no_output_last(model):
    inner = model.model
    real = inner._output_last
    inner._output_last = lambda *a, **k: None
    try:
        yield
    finally:
        inner._output_last = real


def vision_step(args):
    cfg = ArlowVisionConfig(depth=args.depth, embed_dim=512, hidden_size=1024, num_heads=8, mlp_ratio=4)
    model = ArlowVLVisionModel._from_config(cfg, attn_implementation="sdpa").train()
    grid = torch.tensor(MIXED_IMAGES)
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim)

    def step():
        model.zero_grad(set_to_none=True)
        model(pixels, grid).last_hidden_state.square().mean().backward()

    return step, f"vision encoder depth {args.depth}, 512 wide, 8 heads, {pixels.shape[0]} patches in 6 images"


def text_model(args):
    cfg = ArlowTextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=args.depth,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    return ArlowForCausalLM._from_config(cfg, attn_implementation="sdpa")


def text_step(args):
    model = text_model(args).train()
    ids = torch.randint(3, 8192, (4, args.seq))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step, f"text decoder depth {args.depth}, 512 wide, 8/4 heads, batch 4 x {args.seq} tokens"


def rotation_rows(args):
    rows = []
    for build in (vision_step, text_step):
        step, what = build(args)
        with_plain = lambda step=step: _run_plain(step)  # noqa: E731
        wall, cpu = interleaved_wall_and_cpu({"arlow": step, "plain": with_plain}, repeats=args.repeats)
        rows.append(["rotation (training step)", what, *_cells(wall, cpu)])
        print(f"  rotation: {what}: done", file=sys.stderr)
    return rows


def _run_plain(step):
    with plain_rotation():
        step()


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
    parser.add_argument("--seq", type=int, default=512)
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
    rows = rotation_rows(args) + output_last_rows(args)
    print(markdown_table(["code", "workload", "Arlow ms", "plain ms", "plain / Arlow (wall)", "plain / Arlow (CPU)"],
                         rows))
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
