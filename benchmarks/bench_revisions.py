"""Two revisions of Arlow side by side: is a change a speed regression?

Each revision's ``src/`` runs in its own worker process (one torch thread each); the parent sends the same case
names to both, one call at a time and alternating which revision goes first, so both see the same machine load.
Same configs, same seeds, same inputs; a revision is given as the path of its ``src/`` folder, e.g. one made with
``git worktree add /tmp/old <commit>``.

    python benchmarks/bench_revisions.py /tmp/old/src               # old vs this checkout's src/
    python benchmarks/bench_revisions.py /tmp/old/src src --quick   # depth 2 / 4 layers, 5 repeats

Cases: the vision encoder's forward (fp32 sdpa; bf16 with the blocked CPU attention, chosen as each revision
chooses it) and a training step (forward + backward), the text decoder's prefill (``logits_to_keep=1``), greedy
decoding and a training step, and the q/k rotation alone under autograd. Ratios are old time / new time: above 1,
the new revision is faster. ``--only TEXT`` keeps the cases whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (t, h, w) patch grids of the mixed-image pack bench_vision.py uses (8 aspect-preserved images, 3632 patches)
MIXED_IMAGES = [(1, 16, 16), (1, 16, 24), (1, 24, 16), (1, 32, 32), (1, 8, 40), (1, 20, 28), (1, 12, 12),
                (1, 28, 20)]


def build_cases(depth: int, layers: int) -> dict:
    """Case name -> a callable running one call, in this worker's revision (imported here: the worker's sys.path)."""
    import torch

    from arlow import ArlowTextConfig, ArlowVisionConfig, ArlowVLVisionModel
    from arlow.modeling.text import ArlowForCausalLM

    try:  # revisions with the kernel seam name the blocked kernel; older ones swapped it in for "sdpa" in bf16
        import arlow.modeling.kernels  # noqa: F401
        bf16_attention = "arlow_blocked_cpu"
    except ImportError:
        bf16_attention = "sdpa"

    def encoder(bias: bool, dtype, attn: str):
        torch.manual_seed(0)
        cfg = ArlowVisionConfig(depth=depth, embed_dim=512, hidden_size=1024, num_heads=8, mlp_ratio=4,
                                use_deformable_attention=bias, use_progressive_patches=False,
                                deepstack_visual_indexes=[])
        return ArlowVLVisionModel._from_config(cfg, attn_implementation=attn).to(dtype)

    def pack(grids, dtype):
        grid = torch.tensor(grids, dtype=torch.long)
        rows = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
        return rows.to(dtype), grid

    cases = {}
    for dtype, attn in ((torch.float32, "sdpa"), (torch.bfloat16, bf16_attention)):
        for bias in (False, True):
            model, (rows, grid) = encoder(bias, dtype, attn).eval(), pack(MIXED_IMAGES, dtype)

            def forward(model=model, rows=rows, grid=grid):
                with torch.inference_mode():
                    model(rows, grid)

            cases[f"vision forward {str(dtype)[6:]}, bias {'on' if bias else 'off'}"] = forward
    train_model, (train_rows, train_grid) = encoder(True, torch.float32, "sdpa").train(), pack(MIXED_IMAGES[:4],
                                                                                              torch.float32)

    def vision_step():
        train_model.zero_grad(set_to_none=True)
        train_model(train_rows, train_grid).last_hidden_state.square().mean().backward()

    cases["vision train step fp32, bias on (1072 patches)"] = vision_step

    torch.manual_seed(0)
    text_cfg = ArlowTextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    text = ArlowForCausalLM._from_config(text_cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(1))

    def prefill():
        with torch.inference_mode():
            text(ids, logits_to_keep=1)

    def decode():
        with torch.inference_mode():
            text.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    train_ids = torch.randint(3, 32000, (2, 128), generator=torch.Generator().manual_seed(2))

    def text_step():
        text.train().zero_grad(set_to_none=True)
        text(train_ids, labels=train_ids).loss.backward()
        text.eval()

    from arlow.modeling.rope import apply_rotary

    # the decoder's q/k rotation under autograd, alone: (B=2, 8 + 2 heads, 128 positions, head_dim 64)
    qk = torch.randn(2, 128, 10, 64, requires_grad=True)
    angles = torch.rand(2, 1, 128, 64) * 6.28

    def rotary_step():
        qk.grad = None
        apply_rotary(qk.transpose(1, 2), angles.cos(), angles.sin()).square().sum().backward()

    cases["rotary forward + backward fp32, (2, 10, 128, 64)"] = rotary_step
    cases["text prefill fp32, B=1 x 128 (logits_to_keep=1)"] = prefill
    cases["text greedy generate fp32, 128 + 16 tokens"] = decode
    cases["text train step fp32, B=2 x 128"] = text_step
    return cases


def worker(depth: int, layers: int, only: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    cases = {k: v for k, v in build_cases(depth, layers).items() if only is None or only in k}
    for run in cases.values():  # warm-up: allocator, oneDNN primitives, caches
        run()
    print(json.dumps(sorted(cases)), flush=True)
    for line in sys.stdin:
        run = cases[line.strip()]
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        print(json.dumps([time.perf_counter() - wall, time.process_time() - cpu]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the old revision's src/ folder")
    parser.add_argument("new", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "src"),
                        help="the new revision's src/ folder (default: this checkout's)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating calls per case (default 7)")
    parser.add_argument("--quick", action="store_true",
                        help="encoder depth 2, decoder 4 layers, 5 repeats unless given")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=6, help="encoder depth")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.layers = 2, 4
    args.repeats = args.repeats or (5 if args.quick else 7)
    if args.worker:
        return worker(args.depth, args.layers, args.only)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine_line, markdown_table

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs, names = {}, None
    for tag, src in (("old", args.old), ("new", args.new)):  # started one after the other: no overlap
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--depth", str(args.depth), "--layers",
                   str(args.layers), *(["--only", args.only] if args.only else []), "-"]
        procs[tag] = subprocess.Popen(command, env={**env, "PYTHONPATH": os.path.abspath(src)}, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        listed = json.loads(procs[tag].stdout.readline())
        if names is not None and listed != names:
            raise SystemExit(f"the revisions run different cases: {names} vs {listed}")
        names = listed
    load_start = os.getloadavg()[0]
    times = {(tag, name): [] for tag in procs for name in names}
    for r in range(args.repeats):
        for i, name in enumerate(names):
            for tag in (("old", "new") if (r + i) % 2 == 0 else ("new", "old")):
                procs[tag].stdin.write(name + "\n")
                procs[tag].stdin.flush()
                times[tag, name].append(json.loads(procs[tag].stdout.readline()))
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()

    def med(tag, name, clock):
        return statistics.median(t[clock] for t in times[tag, name])

    rows = [[name, f"{med('old', name, 0) * 1000:.0f}", f"{med('new', name, 0) * 1000:.0f}",
             f"{med('old', name, 0) / med('new', name, 0):.2f}x", f"{med('old', name, 1) / med('new', name, 1):.2f}x"]
            for name in names]
    print(f"{machine_line()}; old {args.old}, new {args.new}; encoder depth {args.depth} (512 wide, 8 heads), "
          f"decoder {args.layers} layers (512 wide, 8/2 heads); median of {args.repeats} alternating calls; "
          f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print(markdown_table(["case", "old ms (wall)", "new ms (wall)", "old / new (wall)", "old / new (CPU time)"], rows))


if __name__ == "__main__":
    main()
