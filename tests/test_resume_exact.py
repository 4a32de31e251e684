"""Exact resume of ``arlow pretrain`` (export and reconstructions at every checkpoint included): an uninterrupted
run equals a run killed with SIGKILL after a checkpoint and continued with ``--resume latest``, bit for bit, in one
process and in two (gloo, launched with torchrun). Every run is a subprocess with one thread, so they compute the
same bits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arlow.training.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[1]
VICTIM = ROOT / "tests" / "_pretrain_victim.py"
# A tiny encoder on 4 built-in photos; checkpoints (with export + reconstructions) at steps 2 and 4.
TINY = ["model.vision.depth=2", "model.vision.embed_dim=64", "model.vision.hidden_size=64",
        "model.vision.num_heads=1", "model.decoder_hidden_size=32", "model.decoder_num_layers=1",
        "model.decoder_num_heads=1", "data.videos=null", "data.resolution=56", "data.tokens_per_batch=64",
        "data.num_workers=0", "train.max_steps=5", "train.save_every=2", "train.keep_last=0", "train.warmup_steps=1",
        "train.log_every=1", "train.precision=fp32", "train.progress_bar=false", "train.tensorboard=false",
        "train.peak_flops=1e12", "reconstruct.num_items=2"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _launch(prefix: list[str], args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(prefix + [str(VICTIM)] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _torchrun() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def _assert_same_run(ref: Path, got: Path, ranks: int) -> None:
    for step in (4, 5):
        a, b = ref / f"checkpoint-{step}", got / f"checkpoint-{step}"
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (step, name, (wa[name] - wb[name]).abs().max())
        ea = load_file(str(a / "vision_encoder" / "model.safetensors"))
        eb = load_file(str(b / "vision_encoder" / "model.safetensors"))
        assert all(torch.equal(ea[n], eb[n]) for n in ea)
        oa, ob = safe_load(a / "optimizer.bin")["state"], safe_load(b / "optimizer.bin")["state"]
        assert oa.keys() == ob.keys()
        for i in oa:
            assert all(torch.equal(oa[i][k], ob[i][k]) for k in ("exp_avg", "exp_avg_sq")), (step, i)
        for rank in range(ranks):
            ra, rb = safe_load(a / f"random_states_{rank}.pkl"), safe_load(b / f"random_states_{rank}.pkl")
            assert torch.equal(ra["torch_manual_seed"], rb["torch_manual_seed"]), (step, rank)
    log = lambda run: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in log(got)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in log(ref)]


def _kill_and_resume(tmp_path: Path, prefix: list[str], ranks: int, env: dict[str, str]) -> None:
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    done = _launch(prefix, TINY + [f"train.output_dir={ref}"], env)
    assert done.returncode == 0, done.stderr[-4000:]
    for name in ("vision_encoder", "reconstructions.png"):
        assert (ref / "checkpoint-2" / name).exists()  # the checkpoint work that used to move the RNG ran

    prefix = _torchrun() if ranks > 1 else prefix
    killed = _launch(prefix, ["--kill-at", "3"] + TINY + [f"train.output_dir={victim}"], env)
    assert killed.returncode != 0 and not (victim / "checkpoint-4").exists(), killed.stderr[-4000:]
    if ranks == 1:
        assert killed.returncode == -signal.SIGKILL
    assert (victim / "checkpoint-2" / "trainer_state.json").is_file()

    prefix = _torchrun() if ranks > 1 else prefix
    resumed = _launch(prefix, TINY + [f"train.output_dir={victim}", "train.resume=latest"], env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    _assert_same_run(ref, victim, ranks)


@pytest.mark.slow  # three runs of `arlow pretrain` in subprocesses: ~40 s on a busy 2-core machine
def test_sigkill_and_resume_latest_is_bit_identical_one_process(tmp_path):
    _kill_and_resume(tmp_path, [sys.executable], 1, _env())


@pytest.mark.slow  # three 2-process torchrun launches: ~90 s on a busy 2-core machine
def test_sigkill_and_resume_latest_is_bit_identical_two_processes(tmp_path):
    env = dict(_env(), ACCELERATE_USE_CPU="1")
    _kill_and_resume(tmp_path, _torchrun(), 2, env)


def test_checkpoint_frequency_does_not_change_the_run(tmp_path):
    """Checkpoints (engine state, export with its model card, reconstruction grid) at every step versus only at
    the end: the same losses and weights, bit for bit. The checkpoint work used to draw from the global RNG that
    MAE masking uses, so ``save_every`` changed the run from the first checkpoint on."""
    from arlow.pretrain.run import load_recipe, pretrain

    base = [o for o in TINY if not o.startswith("train.save_every")]
    runs = {}
    for every in (1, 0):  # 0: only the last step is checkpointed
        out = tmp_path / f"every-{every}"
        pretrain(load_recipe(None, base + [f"train.save_every={every}", f"train.output_dir={out}"]))
        runs[every] = out
    assert (runs[1] / "checkpoint-2" / "reconstructions.png").exists()  # the hook's work ran mid-run
    assert not (runs[0] / "checkpoint-2").exists()
    log = lambda run: [(r["step"], r["loss"], r["grad_norm"])  # noqa: E731
                       for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(log(runs[1])) == 5 and log(runs[1]) == log(runs[0])
    wa = load_file(str(runs[1] / "checkpoint-5" / "model.safetensors"))
    wb = load_file(str(runs[0] / "checkpoint-5" / "model.safetensors"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
