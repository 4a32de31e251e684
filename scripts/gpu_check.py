"""Arlow's device check: what a GPU machine must show before the model-card run is launched on it.

Each step prints one line ``[gpu-check] STEP STATUS - figures`` (STATUS: PASS, FAIL or SKIP) and the next step runs
whatever happened. ``scripts/gpu_check.sh`` runs every step in its own process under a time limit and collects the
lines; this file can also be run directly:

    python scripts/gpu_check.py                           # every step on the GPU (DEVICE=cuda)
    python scripts/gpu_check.py --device cpu --quick      # rehearsal on the CPU, tiny shapes (about a minute)
    python scripts/gpu_check.py attention mfu             # some steps (--list names them)

Steps (full sizes; ``--quick`` shrinks every model to a few hundred thousand parameters):

  env            torch / transformers / accelerate versions against pyproject.toml's ranges, ``import arlow`` and
                 the modules a run imports, the device (name, memory, bf16) and PyAV (needed by ``arlow pretrain``)
  attention      the vision encoder at the model card's width (1536, 24 heads) on a pack of images and a clip:
                 sdpa == eager and arlow_flex == eager on the device in fp32 (forward and gradients), bf16 against
                 fp32, the device against the CPU, with and without the locality bias; bf16 fwd+bwd time per kernel
  mfu            the model-card MAE (48 x 1536 encoder, 8 x 512 decoder) training step as ``arlow pretrain`` runs it
                 (fp32 weights, bf16 autocast, clipping, fused AdamW) at the recipe's micro-batch of 4,096 patch rows
                 (16 images) and at 16,384: images/s, MFU against the bf16 matmul peak measured in the same process
                 (target >= 45% at the recipe's micro-batch, issue 16), memory, host-device syncs per step; sdpa and
                 arlow_flex
  compile        ``train.compile`` (torch.compile of the blocks): loss and gradients equal to eager, graph breaks,
                 compile time, bf16 step time against eager
  checkpointing  ``train.activation_checkpointing``: loss and gradients equal to without, peak memory of both
  generate       the text LM and the VLM (small preset, one image): prefill logits against the CPU in fp32, greedy
                 tokens, bf16 tokens/s, the VLM with its vision tower on arlow_flex against sdpa
  ddp, fsdp2     one process through ``torchrun`` / ``accelerate launch --config_file configs/accelerate/fsdp.yaml``
                 training a small MAE with the engine for a few steps (FSDP2: parameters are DTensors)
  zero2          the same under DeepSpeed ZeRO-2 (the shipped JSON) in fp16 with loss scaling, the card's setting
                 (bf16 on CPUs); skipped when DeepSpeed is not installed
  pretrain       ``arlow pretrain --config model_card`` end to end (4 blocks, built-in media, bf16, 20 steps): exit
                 status, log fields (mfu, compute_time, comm_time), the export (needs PyAV)

Environment: ``DEVICE`` (cuda / cpu), ``MAE_DEPTH`` (48), ``MFU_TARGET`` (0.45), ``GPU_CHECK_WORK`` (scratch folder).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "attention", "mfu", "compile", "checkpointing", "generate", "ddp", "fsdp2", "zero2", "pretrain")
CARD = dict(embed_dim=1536, num_heads=24, hidden_size=3072)  # the published encoder's width (depth 48)
QUICK = dict(embed_dim=64, num_heads=2, hidden_size=64)
RESULTS: list[tuple[str, str, str]] = []


def result(step: str, status: str, detail: str) -> None:
    RESULTS.append((step, status, detail))
    print(f"[gpu-check] {step:<16} {status:<4} - {detail}", flush=True)


def info(text: str) -> None:
    print(f"[gpu-check]   {text}", flush=True)


def rel(a, b) -> float:
    """Relative error ``|a - b| / |b|`` (Frobenius), computed in fp32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class Context:
    def __init__(self, device: str, quick: bool, work: Path):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.quick = quick
        self.work = work
        self.width = QUICK if quick else CARD
        self.mae_depth = 2 if quick else int(os.environ.get("MAE_DEPTH", "48"))
        self.target = float(os.environ.get("MFU_TARGET", "0.45"))
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons mean fp32 (TF32 rounds to 10 bits)
            torch.backends.cudnn.allow_tf32 = False

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def timed(self, fn, reps: int) -> float:
        """Seconds per call of ``fn`` after two warm-up calls."""
        fn(), fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        self.sync()
        return (time.perf_counter() - start) / reps

    def peak_memory(self, fn) -> float | None:
        """GiB allocated at the peak of ``fn`` above what was allocated before (CUDA only)."""
        if not self.cuda:
            fn()
            return None
        torch = self.torch
        self.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**30


# ----------------------------------------------------------------------------------------------------------------
# shared builders


def image_batch(ctx: Context, n_images: int, seed: int = 0, device=None):
    """``n_images`` random images (224 px; 112 px in quick mode) as the data pipeline packs them: patch rows on the
    device (or ``device``), ``grid_thw`` on the host (the engine leaves it there: ``host_input_names``)."""
    torch = ctx.torch
    from arlow.processing.patches import patchify

    res = 112 if ctx.quick else 224
    g = torch.Generator().manual_seed(seed)
    rows, grids = zip(*(patchify(torch.rand(2, 3, res, res, generator=g), 14, 2, 2) for _ in range(n_images)))
    return torch.cat(rows).to(device or ctx.device), torch.stack(grids)


def mae_config(ctx: Context, depth: int, attn: str = "sdpa"):
    from arlow.pretrain.mae import ArlowMAEConfig

    dec = dict(decoder_hidden_size=64, decoder_num_layers=2, decoder_num_heads=2) if ctx.quick else dict(
        decoder_hidden_size=512, decoder_num_layers=8, decoder_num_heads=8)  # the model-card recipe's decoder
    cfg = ArlowMAEConfig(vision_config=dict(depth=depth, **ctx.width), **dec)
    cfg.vision_config._attn_implementation = attn
    return cfg


def build_mae(ctx: Context, depth: int, attn: str = "sdpa", seed: int = 0):
    """The MAE built directly on the device (a 1.6 B-parameter encoder initialised on the host takes a while)."""
    torch = ctx.torch
    from arlow.pretrain.mae import ArlowMAEForPreTraining

    torch.manual_seed(seed)
    with torch.device(ctx.device):
        model = ArlowMAEForPreTraining(mae_config(ctx, depth, attn))
    return model.to(ctx.device).train()  # anything created with an explicit CPU device follows


def window_noise(grid, seed: int):
    """One masking score per window of one slice of each item: fixed masks for comparisons."""
    import torch

    total = int(sum(int(h) * int(w) // 4 for _, h, w in grid.tolist()))
    return torch.rand(total, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, px, grid, noise, autocast_dtype=None):
    """One forward + backward; returns ``(loss, {name: grad})`` and clears the gradients."""
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast(px.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(px, grid, noise=noise).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def worst_grad(grads, ref) -> tuple[float, str]:
    """The largest relative gradient difference over parameters, and its parameter (missing gradients count 1)."""
    worst, where = 0.0, ""
    for name, g in ref.items():
        e = rel(grads[name], g) if name in grads else 1.0
        if e > worst:
            worst, where = e, name
    return worst, where


# ----------------------------------------------------------------------------------------------------------------
# steps


def step_env(ctx: Context) -> None:
    torch = ctx.torch
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {Requirement(d).name: Requirement(d) for d in deps}
    seen, bad = [], []
    for name in ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface_hub", "av"):
        module = {"huggingface_hub": "huggingface_hub"}.get(name, name)
        try:
            version = importlib.import_module(module).__version__
        except ImportError:
            seen.append(f"{name} -")
            if name != "av":
                bad.append(f"{name} missing")
            continue
        seen.append(f"{name} {version}")
        spec = wanted.get(name)
        if spec and not spec.specifier.contains(Version(version.split("+")[0]), prereleases=True):
            bad.append(f"{name} {version} outside {spec.specifier}")
    for name in ("deepspeed", "flash_attn", "bitsandbytes", "peft"):
        seen.append(f"{name} {'yes' if importlib.util.find_spec(name) else '-'}")
    info("versions: " + ", ".join(seen))
    modules = ["arlow", "arlow.modeling.multimodal", "arlow.pretrain.mae", "arlow.training",
               "arlow.modeling.kernels.flex_attention"]
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - reported
            bad.append(f"import {module}: {type(err).__name__}: {str(err)[:160]}")
    has_av = importlib.util.find_spec("av") is not None
    if ctx.cuda:
        if not torch.cuda.is_available():
            bad.append(f"torch.cuda.is_available() is False (torch {torch.__version__}, cuda {torch.version.cuda})")
            device = "no GPU"
        else:
            p = torch.cuda.get_device_properties(0)
            device = (f"{torch.cuda.device_count()} x {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} "
                      f"GiB, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        device = f"CPU rehearsal ({torch.get_num_threads()} thread(s))"
    detail = (f"{device}; python {sys.version.split()[0]}; torch {torch.__version__}; "
              f"PyAV {'present' if has_av else 'MISSING (carry its wheel: arlow pretrain and videos need it)'}")
    result("env", "FAIL" if bad else "PASS", detail + ("; " + "; ".join(bad) if bad else ""))


def step_attention(ctx: Context) -> None:
    torch = ctx.torch
    from arlow import ArlowVisionConfig, ArlowVLVisionModel
    from arlow.processing.patches import patchify

    s = 1 if ctx.quick else 2  # item sizes: two equal images (one batched group), odd sizes, a 4-slice clip
    g = torch.Generator().manual_seed(0)
    frames = [(2, 112, 112), (2, 224, 168), (8, 112, 112), (2, 56, 84), (2, 112, 112)]
    rows, grids = zip(*(patchify(torch.rand(t, 3, h * s, w * s, generator=g), 14, 2, 2) for t, h, w in frames))
    rows, grid = torch.cat(rows), torch.stack(grids)
    cfg = ArlowVisionConfig(depth=2, deepstack_visual_indexes=[0], **ctx.width)
    torch.manual_seed(0)
    model = ArlowVLVisionModel._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # weights ~ 1/sqrt(fan_in): scores of order one, so attention patterns and the bias matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
    info(f"encoder 2 x {cfg.embed_dim}, {cfg.num_heads} heads; pack of {len(frames)} items, {rows.shape[0]} rows")

    def run(m, impl, bias, dtype=torch.float32, grad=False):
        m.config._attn_implementation = impl
        m.config.use_deformable_attention = bias
        x = rows.to(ctx.device, dtype)
        if not grad:
            with torch.no_grad():
                return m(x, grid).last_hidden_state.float(), None
        m.zero_grad(set_to_none=True)
        out = m(x, grid)
        (out.last_hidden_state.float().pow(2).mean() + out.deepstack_features[0].float().pow(2).mean()).backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        return out.last_hidden_state.detach().float(), grads

    cpu_ref = {bias: run(model, "eager", bias)[0] for bias in (True, False)}
    info(f"the locality bias changes the output by {rel(cpu_ref[False], cpu_ref[True]):.2f} (relative)")
    dev = copy.deepcopy(model).to(ctx.device)
    flex_grads = ctx.cuda  # flex has no backward on the CPU (PyTorch's flex_attention: CPU inference only)
    ok = {"device": True, "sdpa": True, "arlow-flex": True}
    notes = {"device": [], "sdpa": [], "arlow-flex": []}
    for bias in (True, False):
        tag = "bias" if bias else "no bias"
        want, want_g = run(dev, "eager", bias, grad=True)
        e = rel(want, cpu_ref[bias])
        ok["device"] &= e < 1e-3
        notes["device"].append(f"{tag} {e:.1e}")
        for impl, step in (("sdpa", "sdpa"), ("arlow_flex", "arlow-flex")):
            train = impl != "arlow_flex" or flex_grads
            got, got_g = run(dev, impl, bias, grad=train)
            e = rel(got, want)
            ge, where = worst_grad(got_g, want_g) if train else (0.0, "")
            got16, _ = run(copy.deepcopy(dev).to(torch.bfloat16).eval(), impl, bias, dtype=torch.bfloat16)
            e16 = rel(got16, want)
            ok[step] &= e < 1e-4 and ge < 1e-3 and e16 < 3e-2
            notes[step].append(f"{tag}: fp32 {e:.1e}" + (f", grads {ge:.1e}" if train else "") + f", bf16 {e16:.1e}")
    result("device-numerics", "PASS" if ok["device"] else "FAIL",
           f"{ctx.device.type} fp32 eager vs CPU fp32 eager: " + "; ".join(notes["device"]) + " (tol 1e-3)")
    suffix = " (tol: fp32 1e-4, grads 1e-3, bf16 3e-2)"
    result("sdpa", "PASS" if ok["sdpa"] else "FAIL", "vs eager on the device; " + "; ".join(notes["sdpa"]) + suffix)
    result("arlow-flex", "PASS" if ok["arlow-flex"] else "FAIL",
           "vs eager on the device; " + "; ".join(notes["arlow-flex"]) + suffix +
           ("" if flex_grads else "; no gradients on CPU (flex trains on GPUs only)"))
    flex_lengths(ctx)
    if ctx.cuda:  # which kernel to pick: bf16 forward + backward of the pack, the locality bias on
        m16 = copy.deepcopy(dev).to(torch.bfloat16).train()
        times = {impl: ctx.timed(lambda impl=impl: run(m16, impl, True, torch.bfloat16, grad=True), 10)
                 for impl in ("sdpa", "arlow_flex", "eager")}
        info("bf16 fwd+bwd of the pack with the bias, 2 blocks: " +
             ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))


def flex_lengths(ctx: Context) -> None:
    """The compiled flex kernel over several pack lengths (a run's packs vary): equal to flex's eager reference, and
    compiled at most twice (the first length static, then one symbolic kernel). On CPUs one length: inductor cannot
    compile CPU flex with a symbolic length (torch 2.13), and arlow_flex runs flex's eager reference there anyway."""
    torch = ctx.torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from arlow.modeling.kernels import flex_attention as flex

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = flex.flex_attention_eager(), flex._compiled_flex()
    heads, dim = (2, 16) if ctx.quick else (24, 64)
    g = torch.Generator().manual_seed(0)
    packs = [[96, 64, 32, 64]] + ([[64, 64], [256, 192, 64], [1024, 512, 320, 64]] if ctx.cuda else [])
    worst, first = 0.0, 0
    for lengths in packs:
        n = sum(lengths)
        q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(ctx.device) for _ in range(3))
        cu = torch.tensor([0] + lengths).cumsum(0)
        coords = torch.rand(n, 3, generator=g).to(ctx.device)
        outs = []
        for kernel in (eager, compiled):
            flex._flex = lambda device, kernel=kernel: kernel
            with torch.no_grad():
                outs.append(flex.pack_attention(q, k, v, cu, dim ** -0.5, coords, 4.0, 0.25))
        worst = max(worst, rel(outs[1], outs[0]))
        first = first or counters["stats"]["unique_graphs"]  # graphs one compilation makes
    flex._flex = flex.select_kernel
    graphs = counters["stats"]["unique_graphs"]
    ok = worst < 1e-4 and graphs <= 2 * first
    result("flex-lengths", "PASS" if ok else "FAIL",
           f"compiled kernel vs eager reference over pack lengths {[sum(p) for p in packs]}: worst rel {worst:.1e} "
           f"(tol 1e-4); {graphs} graphs compiled, {first} for the first length (at most two compilations)")


def step_mfu(ctx: Context) -> None:
    torch = ctx.torch
    from arlow.pretrain.mae import mae_train_flops
    from arlow.training.mfu import measure_matmul_peak

    peak = measure_matmul_peak(torch.bfloat16, ctx.device, size=512 if ctx.quick else None)
    info(f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s")
    attns = ["sdpa", "arlow_flex"] if ctx.cuda else ["sdpa"]  # flex trains on GPUs only
    sizes = (4, 16) if ctx.quick else (16, 64)  # images per micro-batch; 16 = the recipe's 4,096 rows
    figures, gate = [], None
    for attn in attns:
        mae = build_mae(ctx, ctx.mae_depth, attn)
        params = [p for p in mae.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in mae.encoder.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=ctx.cuda)
        for n_img in sizes:
            px, grid = image_batch(ctx, n_img)
            losses = []

            def step():
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                    loss = mae(px, grid).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())

            mem = ctx.peak_memory(step)
            dt = ctx.timed(step, 3 if ctx.quick else 10)
            mfu = mae_train_flops(mae.config, grid) / dt / peak
            finite = bool(torch.stack(losses).isfinite().all())
            first, last = losses[0].item(), losses[-1].item()
            line = (f"{attn} {n_img} img ({int(grid.prod(1).sum())} rows): {dt * 1e3:.0f} ms/step, {n_img / dt:.1f} "
                    f"img/s, MFU {100 * mfu:.1f}%" + (f", {mem:.1f} GiB" if mem is not None else "") +
                    f", loss {first:.3f}->{last:.3f}")
            figures.append(line)
            info(line)
            if not finite:
                result("mae-step", "FAIL", f"non-finite loss: {line}")
                return
            if attn == "sdpa" and n_img == sizes[0]:
                gate = mfu
        if ctx.cuda and attn == "sdpa":  # synchronising CUDA calls in one step (the engine adds one read per record)
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
                ctx.sync()
            torch.cuda.set_sync_debug_mode(0)
            syncs = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
            info(f"synchronising CUDA calls in one step: {len(syncs)}" + (f" ({', '.join(syncs[:6])})" if syncs else ""))
        del mae, opt
        if ctx.cuda:
            torch.cuda.empty_cache()
    result("mae-step", "PASS", f"MAE {ctx.mae_depth} x {ctx.width['embed_dim']} encoder ({n_params / 1e6:,.1f} M "
           f"parameters), bf16 autocast, clipping, AdamW{' (fused)' if ctx.cuda else ''}: finite losses at every size")
    summary = f"{100 * gate:.1f}% at the recipe's micro-batch (sdpa; target {100 * ctx.target:.0f}%); " + "; ".join(figures)
    if ctx.cuda:
        result("mfu", "PASS" if gate >= ctx.target else "FAIL", summary)
    else:
        result("mfu", "SKIP", "target applies to GPUs; CPU figure: " + summary)


def step_compile(ctx: Context) -> None:
    torch = ctx.torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from arlow.training.switches import compile_blocks

    depth = 2 if ctx.quick else 4
    eager = build_mae(ctx, depth)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    blocks = compile_blocks(compiled)
    px, grid = image_batch(ctx, 4)
    noise = window_noise(grid, 1)
    loss, grads = loss_and_grads(eager, px, grid, noise)
    t = time.perf_counter()
    closs, cgrads = loss_and_grads(compiled, px, grid, noise)
    first = time.perf_counter() - t
    breaks = sum(counters["graph_break"].values())
    e, ge = rel(closs, loss), worst_grad(cgrads, grads)
    figures = (f"{blocks} blocks compiled, {breaks} graph breaks inside them, first step {first:.0f} s; fp32 loss "
               f"rel {e:.1e}, worst grad rel {ge[0]:.1e} ({ge[1]})")
    ok = e < 1e-4 and ge[0] < 1e-3
    if ctx.cuda:
        def time_step(m):
            return ctx.timed(lambda: loss_and_grads(m, px, grid, noise, torch.bfloat16), 5)
        te, tc = time_step(eager), time_step(compiled)
        figures += f"; bf16 fwd+bwd {te * 1e3:.0f} ms eager, {tc * 1e3:.0f} ms compiled ({te / tc:.2f}x)"
    result("compile", "PASS" if ok else "FAIL", figures + " (tol 1e-4 / 1e-3)")


def step_checkpointing(ctx: Context) -> None:
    torch = ctx.torch
    from arlow.training.switches import enable_activation_checkpointing

    depth = 2 if ctx.quick else 8
    plain = build_mae(ctx, depth)
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    px, grid = image_batch(ctx, 4 if ctx.quick else 32)
    noise = window_noise(grid, 2)
    loss, grads = loss_and_grads(plain, px, grid, noise)
    closs, cgrads = loss_and_grads(ckpt, px, grid, noise)
    e, ge = rel(closs, loss), worst_grad(cgrads, grads)
    figures = f"fp32 loss rel {e:.1e}, worst grad rel {ge[0]:.1e}"
    if ctx.cuda:
        mem = [ctx.peak_memory(lambda m=m: loss_and_grads(m, px, grid, noise, torch.bfloat16)) for m in (plain, ckpt)]
        figures += (f"; bf16 step peak {mem[0]:.2f} GiB -> {mem[1]:.2f} GiB with checkpointing "
                    f"({depth} blocks, {px.shape[0]} rows)")
    result("checkpointing", "PASS" if e < 1e-5 and ge[0] < 1e-5 else "FAIL", figures + " (tol 1e-5)")


def step_generate(ctx: Context) -> None:
    torch = ctx.torch
    from importlib import resources

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from arlow.assemble import build_preset, save_model_dir

    preset = "tiny" if ctx.quick else "small"
    folders = {}
    for kind, text_only in (("text", True), ("vlm", False)):
        folders[kind] = ctx.work / f"{preset}-{kind}"
        if not folders[kind].is_dir():
            model, proc = build_preset(preset, text_only=text_only, seed=0)
            save_model_dir(model, proc, folders[kind])
    proc = AutoProcessor.from_pretrained(folders["vlm"])
    photos = sorted(str(p) for p in (resources.files("arlow") / "assets" / "media" / "images").iterdir()
                    if str(p).endswith(".jpg"))
    conv = [{"role": "user", "content": [{"type": "image", "path": photos[0]},
                                         {"type": "text", "text": "Describe this image."}]}]
    prompts = {
        "vlm": proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt"),
        "text": proc.tokenizer("The quick brown fox", return_tensors="pt"),
    }
    loaders = {"vlm": AutoModelForImageTextToText, "text": AutoModelForCausalLM}
    n_new = 8 if ctx.quick else 32

    def prefill_and_greedy(m, inputs, n):
        inputs = {k: v.to(m.device) for k, v in inputs.items()}
        with torch.no_grad():
            logits = m(**inputs).logits[0, -1].float().cpu()
            out = m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return logits, out[0, inputs["input_ids"].shape[1]:].cpu()

    for kind in ("text", "vlm"):
        inputs = prompts[kind]
        cpu = loaders[kind].from_pretrained(folders[kind], dtype=torch.float32).eval()
        ref_logits, ref_tokens = prefill_and_greedy(cpu, inputs, n_new)
        del cpu
        m32 = loaders[kind].from_pretrained(folders[kind], dtype=torch.float32).to(ctx.device).eval()
        l32, t32 = prefill_and_greedy(m32, inputs, n_new)
        e32, same = rel(l32, ref_logits), (t32 == ref_tokens).float().mean().item()
        figures = f"{preset} preset, {inputs['input_ids'].shape[1]}-token prompt: fp32 logits vs CPU {e32:.1e}, " \
                  f"greedy tokens equal {100 * same:.0f}%"
        ok = e32 < 1e-3
        if kind == "vlm":  # the vision tower on the fused flex kernel (locality bias on) against sdpa
            mf = AutoModelForImageTextToText.from_pretrained(
                folders[kind], dtype=torch.float32,
                attn_implementation={"vision_config": "arlow_flex", "text_config": "sdpa"}).to(ctx.device).eval()
            ef = rel(prefill_and_greedy(mf, inputs, 1)[0], l32)
            ok &= ef < 1e-4
            figures += f"; vision arlow_flex vs sdpa {ef:.1e}"
            del mf
        del m32
        m16 = loaders[kind].from_pretrained(folders[kind], dtype=torch.bfloat16).to(ctx.device).eval()
        l16, _ = prefill_and_greedy(m16, inputs, 2)
        e16 = rel(l16, ref_logits)
        t = time.perf_counter()
        _, toks = prefill_and_greedy(m16, inputs, n_new)
        ctx.sync()
        rate = n_new / (time.perf_counter() - t)
        ok &= e16 < 5e-2 and toks.numel() == n_new
        figures += f"; bf16 logits {e16:.1e}, generate {n_new} tokens at {rate:.0f} tok/s (batch 1, prefill included)"
        result(f"generate-{kind}", "PASS" if ok else "FAIL", figures + " (tol fp32 1e-3, flex 1e-4, bf16 5e-2)")
        del m16


# -- distributed smoke: the engine under a launcher, one process


class SyntheticImages:
    """Endless micro-batches of random images with a resumable position (the engine's data contract)."""

    def __init__(self, ctx: Context, n_images: int):
        self.ctx, self.n_images, self.position = ctx, n_images, 0

    def __iter__(self):
        while True:
            self.position += 1
            px, grid = image_batch(self.ctx, self.n_images, seed=self.position, device="cpu")
            yield {"pixel_values": px, "grid_thw": grid, "num_tokens": px.shape[0], "num_samples": self.n_images}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def worker(ctx: Context, kind: str, out: Path) -> None:
    """Runs under the launcher: a small MAE trained by the engine for 6 steps; writes ``result.json``."""
    torch = ctx.torch
    from torch.distributed.tensor import DTensor

    from arlow.pretrain.mae import mae_train_flops
    from arlow.training import TrainConfig, Trainer

    model = build_mae(ctx, 2)
    model.to("cpu")  # as the CLI hands it over: the engine places it
    zero2 = kind == "zero2"
    cfg = TrainConfig(output_dir=str(out / "run"), max_steps=6, log_every=2, warmup_steps=1,
                      precision="fp16" if zero2 and ctx.cuda else "bf16", deepspeed_config="zero2" if zero2 else None,
                      save_every=0, tensorboard=False, progress_bar=False, cpu=not ctx.cuda)
    trainer = Trainer(cfg, model, SyntheticImages(ctx, 4),
                      flops_per_batch=lambda b: mae_train_flops(model.config, b["grid_thw"]))
    sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters())
    summary = trainer.train()
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    (out / "result.json").write_text(json.dumps({
        "distributed_type": str(trainer.accelerator.distributed_type), "world": trainer.accelerator.num_processes,
        "dtensor_params": sharded, "params": sum(1 for _ in trainer.model.parameters()),
        "loss": summary["last_step_loss"], "last": records[-1], "torch": torch.__version__,
        "precision": cfg.precision}, default=str))


def run_or_fail(name: str, cmd: list[str], needed: Path) -> tuple[subprocess.CompletedProcess, float] | None:
    """Run ``cmd`` from the repository root; return (process, seconds), or report ``name`` FAIL with the tail of
    its output and return None when it exits non-zero or leaves no ``needed`` file."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - t
    if proc.returncode != 0 or not needed.exists():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        result(name, "FAIL", f"exit {proc.returncode} after {took:.0f} s: {tail[-400:]}")
        return None
    return proc, took


def step_launch(ctx: Context, kind: str) -> None:
    if kind == "zero2" and importlib.util.find_spec("deepspeed") is None:
        result(kind, "SKIP", "DeepSpeed is not installed (carry a wheel built with pip wheel --no-deps deepspeed)")
        return
    out = ctx.work / kind
    (out / "run").mkdir(parents=True, exist_ok=True)
    for stale in (out / "run").iterdir():  # a fresh run refuses an output folder with checkpoints
        subprocess.run(["rm", "-rf", str(stale)], check=False)
    me = [str(Path(__file__).resolve()), "--device", ctx.device.type, "--worker", kind, "--work", str(out)]
    if ctx.quick:
        me.append("--quick")
    if kind in ("ddp", "zero2"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *me]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "src/arlow/configs/accelerate/fsdp.yaml"), "--num_processes", "1", *me]
    res = out / "result.json"
    ran = run_or_fail(kind, cmd, res)
    if ran is None:
        return
    _, took = ran
    r = json.loads(res.read_text())
    last = r["last"]
    ok = math.isfinite(r["loss"]) and all(last.get(k) is not None for k in ("mfu", "compute_time", "comm_time"))
    figures = (f"{r['distributed_type']}, {r['world']} process, 6 {r['precision']} steps in {took:.0f} s (launch "
               f"included): loss "
               f"{r['loss']:.3f}, compute_time {last['compute_time']:.3f} s, comm_time {last['comm_time']:.3f} s, "
               f"mfu {100 * (last['mfu'] or 0):.1f}%")
    if kind == "zero2":
        figures += f", loss_scale {last.get('loss_scale')}, overflow_skipped {last.get('overflow_skipped')}"
        ok &= "DEEPSPEED" in r["distributed_type"]
    if kind == "fsdp2":
        figures += f", {r['dtensor_params']}/{r['params']} parameters are DTensors"
        if ctx.cuda:
            ok &= r["dtensor_params"] == r["params"]
        else:
            figures += " (one CPU process: accelerate shards on GPUs; 2 CPU processes: tests/test_engine_distributed.py)"
    result(kind, "PASS" if ok else "FAIL", figures)


def step_pretrain(ctx: Context) -> None:
    if importlib.util.find_spec("av") is None:
        result("pretrain", "SKIP", "PyAV is not installed: carry its wheel (docs/pretraining.md, 'Device check')")
        return
    out = ctx.work / "pretrain"
    subprocess.run(["rm", "-rf", str(out)], check=False)
    size = (["model.vision.depth=2", "model.vision.embed_dim=64", "model.vision.num_heads=2",
             "model.vision.hidden_size=64", "model.decoder_hidden_size=64", "model.decoder_num_layers=2",
             "model.decoder_num_heads=2", "data.resolution=112", "data.clip_frames=4", "data.frame_stride=2",
             "data.tokens_per_batch=1024", "data.tokens_per_step=2048", "data.num_workers=0", "train.max_steps=4",
             "train.log_every=2", "train.cpu=true"] if ctx.quick else
            ["model.vision.depth=4", "data.tokens_per_batch=4096", "data.tokens_per_step=8192", "data.num_workers=4",
             "train.max_steps=20", "train.log_every=5"])
    cmd = [sys.executable, "-m", "arlow.cli", "pretrain", "--config", "model_card", "data.images=builtin",
           "data.videos=builtin", "train.deepspeed_config=null", "train.precision=bf16", "train.save_every=0",
           "train.warmup_steps=2", "train.progress_bar=false", "train.tensorboard=false", "reconstruct.num_items=2",
           f"train.output_dir={out}", *size]
    log = out / "log.jsonl"
    ran = run_or_fail("pretrain", cmd, log)
    if ran is None:
        return
    proc, took = ran
    plan = [line for line in proc.stdout.splitlines() if line.startswith(("step:", "run:"))]
    for line in plan:
        info(line)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    last = records[-1]
    ckpts = sorted(out.glob("checkpoint-*"))
    export = bool(ckpts) and (ckpts[-1] / "vision_encoder" / "config.json").exists()
    fields = all(last.get(k) is not None for k in ("loss", "mfu", "compute_time", "comm_time", "tokens_per_s"))
    ok = export and fields and len(plan) == 2 and math.isfinite(float(last["loss"]))
    result("pretrain", "PASS" if ok else "FAIL",
           f"model_card recipe, {last['step']} steps in {took:.0f} s: loss {records[0]['loss']:.3f}->{last['loss']:.3f}, "
           f"{last['samples_per_s']:.1f} samples/s, mfu {100 * last['mfu']:.1f}%, compute_time "
           f"{last['compute_time']:.3f} s, export {'ok' if export else 'MISSING'}, start-up plan "
           f"{'printed' if len(plan) == 2 else 'MISSING'}")


RUNNERS = {"env": step_env, "attention": step_attention, "mfu": step_mfu, "compile": step_compile,
           "checkpointing": step_checkpointing, "generate": step_generate,
           "ddp": lambda ctx: step_launch(ctx, "ddp"), "fsdp2": lambda ctx: step_launch(ctx, "fsdp2"),
           "zero2": lambda ctx: step_launch(ctx, "zero2"),
           "pretrain": step_pretrain}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="*", help=f"steps to run (default: all): {', '.join(STEPS)}")
    parser.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the CPU rehearsal)")
    parser.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK"), help="scratch folder")
    parser.add_argument("--list", action="store_true", help="print the step names and exit")
    parser.add_argument("--worker", choices=["ddp", "fsdp2", "zero2"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        print(" ".join(STEPS))
        return 0
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # CPU rehearsal
    work = Path(args.work or tempfile.mkdtemp(prefix="arlow-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.device, args.quick, work)
    if args.worker:
        worker(ctx, args.worker, work)
        return 0
    for name in args.steps or STEPS:
        t = time.perf_counter()
        try:
            RUNNERS[name](ctx)
        except Exception as err:  # noqa: BLE001 - one step's failure is reported and the next step runs
            result(name, "FAIL", f"{type(err).__name__}: {str(err)[:300]}")
            info(traceback.format_exc().strip().splitlines()[-3].strip())
        info(f"{name}: {time.perf_counter() - t:.0f} s")
    return 1 if any(status == "FAIL" for _, status, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
