"""Time to first token and decode speed of ArlowForConditionalGeneration against transformers'
Qwen2VLForConditionalGeneration (CPU, sdpa, random weights, same shapes, same process).

Two requests, both batch 1:

* image: one 448x448 image (32x32 patches -> 256 merged tokens) + 64 text tokens;
* video: one 8-frame 224x224 clip (4 temporal patches x 16x16 -> 256 merged tokens) + 64 text tokens.

Shapes are matched: vision depth/width/heads/MLP ratio and activation (quick GELU), the 2x2 merger, text width,
depth, GQA heads, SwiGLU width, q/k/v biases, vocabulary. The Arlow model runs "plain" (no locality bias, no
progressive patches, no DeepStack: the features Qwen2-VL lacks) and, in an extra row, with the published encoder's
features switched on. By default an Arlow video attends over the whole clip, a Qwen2-VL video within each temporal
slice (4x fewer attention scores here); the video rows add Arlow with ``video_attention="frame"``, which attends as
Qwen2-VL does.

Both numbers come from one greedy ``generate(max_new_tokens=1 + new)`` call (``min_new_tokens`` forcing the length)
with a stopping criterion that only records the time of every generated token:

* TTFT = start of ``generate`` to the first token (vision tower + prefill + generate's own set-up);
* decode tokens/s = new / (time of the last token - time of the first).

Candidates run interleaved and repeated (the machine is shared); the tables report medians and ratios, of wall time
and, in parentheses, of this process's CPU time (less sensitive to other processes taking the cores).

    python benchmarks/bench_vlm.py                 # fp32 and bf16, 5 repeats, a few minutes on 2 cores
    python benchmarks/bench_vlm.py --reps 3 --dtypes float32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import torch
from common import interleaved_times, machine_line, markdown_table, median
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

import arlow  # noqa: F401
from arlow.modeling.kernels.linear import pack_weights
from arlow import ArlowConfig, ArlowForConditionalGeneration


FRAME = "arlow, video_attention=frame"


def configs(args, features: bool, video_attention: str = "clip"):
    head_dim = args.hidden // args.heads
    third = head_dim // 2 // 3
    qwen = Qwen2VLConfig(
        vision_config=dict(depth=args.vision_depth, embed_dim=args.vision_width, num_heads=args.vision_heads,
                           hidden_size=args.hidden, mlp_ratio=4, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [head_dim // 2 - 2 * third, third, third]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        image_token_id=args.vocab - 4, video_token_id=args.vocab - 3, vision_start_token_id=args.vocab - 2,
        vision_end_token_id=args.vocab - 1,
    )
    vision = dict(depth=args.vision_depth, embed_dim=args.vision_width, num_heads=args.vision_heads,
                  hidden_size=args.hidden, mlp_ratio=4.0, hidden_act="quick_gelu", video_attention=video_attention)
    if not features:
        vision.update(use_deformable_attention=False, use_progressive_patches=False, deepstack_visual_indexes=[])
    ours = ArlowConfig(
        vision_config=vision,
        text_config=dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, attention_bias=True, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    )
    return qwen, ours


def requests(args, kind: str, arlow_cfg, qwen_cfg):
    """The same request for both models: patch rows, grid and an id sequence with one placeholder run."""
    g = torch.Generator().manual_seed(0)
    if kind == "image":
        grid = torch.tensor([[1, args.image // 14, args.image // 14]])
    else:
        grid = torch.tensor([[args.frames // 2, args.video // 14, args.video // 14]])
    rows = int(grid.prod())
    pixels = torch.randn(rows, 3 * 2 * 14 * 14, generator=g)
    n_visual = rows // 4
    text = torch.randint(10, args.vocab - 10, (args.text,), generator=g)
    half = args.text // 2

    def ids(start, placeholder, end):
        run = torch.full((n_visual,), placeholder)
        return torch.cat([text[:half], torch.tensor([start]), run, torch.tensor([end]), text[half:]])[None]

    pix_key, grid_key = ("pixel_values", "image_grid_thw") if kind == "image" else \
        ("pixel_values_videos", "video_grid_thw")
    token = "image_token_id" if kind == "image" else "video_token_id"
    ours = {"input_ids": ids(arlow_cfg.vision_start_token_id, getattr(arlow_cfg, token), arlow_cfg.vision_end_token_id),
            pix_key: pixels, grid_key: grid}
    qwen_ids = ids(qwen_cfg.vision_start_token_id, getattr(qwen_cfg, token), qwen_cfg.vision_end_token_id)
    qwen = {"input_ids": qwen_ids, pix_key: pixels, grid_key: grid,
            "mm_token_type_ids": (qwen_ids == getattr(qwen_cfg, token)).int() * (1 if kind == "image" else 2)}
    if kind == "video":
        ours["second_per_grid_ts"] = torch.tensor([1.0])  # Qwen2-VL has no real-time video positions
    return ours, qwen


class TokenClock(StoppingCriteria):
    """Records when each token is generated; never stops generation."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(model, inputs, new: int, record: list) -> None:
    """One timed request; appends ``(ttft_s, decode_tokens_per_s, ttft_cpu_s, decode_tokens_per_cpu_s)``."""
    clock = TokenClock()
    with torch.inference_mode():
        start, start_cpu = time.perf_counter(), time.process_time()
        model.generate(**inputs, max_new_tokens=1 + new, min_new_tokens=1 + new, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
    assert len(clock.times) == 1 + new
    record.append((clock.times[0] - start, new / (clock.times[-1] - clock.times[0]),
                   clock.cpu[0] - start_cpu, new / (clock.cpu[-1] - clock.cpu[0])))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision-depth", type=int, default=8)
    parser.add_argument("--vision-width", type=int, default=384)
    parser.add_argument("--vision-heads", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--image", type=int, default=448, help="image side in pixels")
    parser.add_argument("--video", type=int, default=224, help="video frame side in pixels")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--text", type=int, default=64, help="text tokens around the placeholder run")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--kinds", nargs="+", default=["image", "video"])
    parser.add_argument("--packed", action="store_true",
                        help="Arlow with oneDNN-packed weights (arlow.modeling.kernels.linear.pack_weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    qwen_cfg, plain_cfg = configs(args, features=False)
    _, full_cfg = configs(args, features=True)
    _, frame_cfg = configs(args, features=False, video_attention="frame")
    # Arlow's vision tower with its blocked CPU attention kernel (bf16 inference; SDPA otherwise), the decoder SDPA
    attn = {"vision_config": "arlow_blocked_cpu", "text_config": "sdpa", "": "sdpa"}
    base = {
        "qwen2-vl": Qwen2VLForConditionalGeneration._from_config(qwen_cfg, attn_implementation="sdpa").eval(),
        "arlow": ArlowForConditionalGeneration._from_config(plain_cfg, attn_implementation=attn).eval(),
        "arlow+features": ArlowForConditionalGeneration._from_config(full_cfg, attn_implementation=attn).eval(),
        FRAME: ArlowForConditionalGeneration._from_config(frame_cfg, attn_implementation=attn).eval(),
    }
    base[FRAME].load_state_dict(base["arlow"].state_dict())  # "arlow" with Qwen2-VL's per-slice video attention
    for model in base.values():
        model.generation_config.eos_token_id = None
    if args.packed:
        for name, model in base.items():
            if name.startswith("arlow"):
                pack_weights(model)  # re-packed after each .to(dtype): the pack follows the weight
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in base.items()}
    print(f"# {machine_line()}; params (M) {', '.join(f'{k} {v:.1f}' for k, v in params.items())}; "
          f"{args.reps} interleaved reps, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {name: m.to(dtype) for name, m in base.items()}
        for kind in args.kinds:
            ours_in, qwen_in = requests(args, kind, plain_cfg, qwen_cfg)
            inputs = {"qwen2-vl": qwen_in, "arlow": ours_in, "arlow+features": ours_in, FRAME: ours_in}
            names = [name for name in models if kind == "video" or name != FRAME]  # images: FRAME == "arlow"
            records = {name: [] for name in names}
            candidates = {name: partial(generate, models[name], inputs[name], args.new, records[name])
                          for name in names}
            interleaved_times(candidates, repeats=args.reps)
            # records[name][0] is the warm-up run
            ttft, decode, ttft_cpu, decode_cpu = ({name: median([r[i] for r in records[name][1:]]) for name in names}
                                                  for i in range(4))
            prompt = ours_in["input_ids"].shape[1]
            for name in names[1:]:
                q = "qwen2-vl"
                ttft_ratio = f"{ttft[q] / ttft[name]:.2f}x ({ttft_cpu[q] / ttft_cpu[name]:.2f}x)"
                decode_ratio = f"{decode[name] / decode[q]:.2f}x ({decode_cpu[name] / decode_cpu[q]:.2f}x)"
                row = [kind, dtype_name, name, prompt, f"{ttft[name] * 1e3:,.0f}", f"{ttft[q] * 1e3:,.0f}", ttft_ratio,
                       f"{decode[name]:,.1f}", f"{decode[q]:,.1f}", decode_ratio]
                rows.append(row)
                print(" | ".join(str(c) for c in row), file=sys.stderr, flush=True)
    print(markdown_table(["request", "dtype", "model", "prompt tokens", "TTFT ms", "Qwen2-VL TTFT ms",
                          "TTFT speed-up wall (CPU)", "decode tok/s", "Qwen2-VL decode tok/s",
                          "decode ratio wall (CPU)"], rows))


if __name__ == "__main__":
    main()
