"""Two CPU processes (gloo), launched the way users launch, give what one process gives with the same global batch.

One process with gradient_accumulation_steps=2 is the reference; DDP (``accelerate launch --multi_gpu``) and
DeepSpeed ZeRO-2 (``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``) run 2 processes x 1
micro-batch. A NaN loss on rank 1 only must make every rank skip that step.
Each launch imports torch + transformers per process (slow on 2 busy cores), so these tests are few, small, and
marked ``slow``; DeepSpeed's CPU shared-memory kernel build is skipped by the toy script (gloo collectives instead).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOY_SCRIPT = ROOT / "tests" / "_engine_toy.py"

# Ordinal 5 = step 3, 2nd micro-batch: rank 1 in the 2-process runs.
TOY_BATCH = 4  # ToySpec().batch: samples per micro-batch
TRAIN = dict(max_steps=6, learning_rate=1e-2, warmup_steps=2, save_every=3, log_every=1, progress_bar=False, tensorboard=False)


def _free_port() -> int:
    with socket.socket() as s:  # other test sessions may hold the default port 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(tmp: Path, name: str, **train) -> Path:
    values = dict(TRAIN, output_dir=str(tmp / name), **train)
    lines = ["train:"] + [f"  {k}: {json.dumps(v)}" for k, v in values.items()] + ["toy:", "  poison: [5]"]
    path = tmp / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(cmd: list[str], extra_env: dict[str, str] | None = None, timeout: int = 600) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _results(out: Path):
    weights = load_file(str(out / "final.safetensors"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return weights, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    _run([sys.executable, str(TOY_SCRIPT), str(_write_config(tmp, "single", gradient_accumulation_steps=2))])
    return _results(tmp / "single")


def _assert_matches(reference, out: Path, atol: float) -> None:
    ref_w, ref_log = reference
    got_w, got_log = _results(out)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.allclose(ref_w[name], got_w[name], atol=atol, rtol=0), (name, (ref_w[name] - got_w[name]).abs().max())
    assert [r["step"] for r in got_log] == list(range(1, 7))
    assert [r["nonfinite_skipped"] for r in got_log] == [r["nonfinite_skipped"] for r in ref_log] == [0, 0, 1, 1, 1, 1]
    for ref, got in zip(ref_log, got_log):
        if ref["loss"] is None:
            assert got["loss"] is None
        else:
            assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert got["samples_per_s"] == pytest.approx(2 * TOY_BATCH / got["step_time"], rel=1e-6)
    ckpt = out / "checkpoint-6"
    assert (ckpt / "data_state_0.pt").is_file() and (ckpt / "data_state_1.pt").is_file()
    assert (ckpt / "random_states_1.pkl").is_file()


def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path, reference):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    config = _write_config(tmp_path, "ddp", gradient_accumulation_steps=1)
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(TOY_SCRIPT), str(config)]
    _run(cmd, {"ACCELERATE_USE_CPU": "1"})
    _assert_matches(reference, tmp_path / "ddp", atol=1e-6)


def test_fsdp2_two_cpu_processes_shard_parameters_and_match_one_process(tmp_path, reference):
    """The shipped FSDP2 accelerate config on 2 CPU processes (gloo): parameters are split between the ranks along
    dim 0 (the parts add up; fc2 has one output row, so its weight and bias live on rank 0 only), and training gives what one process
    (and DDP) gives."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    config = _write_config(tmp_path, "fsdp", gradient_accumulation_steps=1)
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(TOY_SCRIPT), str(config)]
    _run(cmd, {"ACCELERATE_USE_CPU": "1"})
    _assert_matches(reference, tmp_path / "fsdp", atol=1e-6)
    sizes = [json.loads((tmp_path / "fsdp" / f"params_{rank}.json").read_text()) for rank in (0, 1)]
    assert sizes[0].keys() == sizes[1].keys() and len(sizes[0]) == 6
    for name, (local0, full) in sizes[0].items():
        local1 = sizes[1][name][0]
        assert local0 + local1 == full, (name, local0, local1, full)
        if not name.startswith("fc2."):  # one row along dim 0: nothing to split
            assert local0 < full and local1 < full, (name, local0, local1, full)
    ckpt = tmp_path / "fsdp" / "checkpoint-6"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir()  # FSDP's sharded state, plus the full weights:
    full = load_file(str(ckpt / "model.safetensors"))
    final = load_file(str(tmp_path / "fsdp" / "final.safetensors"))
    assert full.keys() == final.keys() and all(torch.equal(full[n], final[n]) for n in final)


def test_deepspeed_zero2_two_processes_match_one_process(tmp_path, reference):
    pytest.importorskip("deepspeed")
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    # DeepSpeed comes from the shipped accelerate config (which names configs/deepspeed/zero2.json), not TrainConfig.
    config = _write_config(tmp_path, "zero2", gradient_accumulation_steps=1)
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(TOY_SCRIPT), str(config)]
    _run(cmd, {"ACCELERATE_USE_CPU": "1"})
    _assert_matches(reference, tmp_path / "zero2", atol=1e-6)
    ckpt = tmp_path / "zero2" / "checkpoint-6"
    assert (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own (ZeRO-partitioned) model/optimizer state
    full = load_file(str(ckpt / "model.safetensors"))  # plus the consolidated fp32 weights
    final = load_file(str(tmp_path / "zero2" / "final.safetensors"))
    assert full.keys() == final.keys() and all(torch.equal(full[n], final[n]) for n in final)


def test_a_data_error_on_one_rank_stops_every_rank(tmp_path):
    # Ordinal 5 is rank 1's 3rd micro-batch. Without the engine's data check rank 0 would wait for rank 1 in the
    # loss all-reduce until gloo's 30-minute timeout.
    config = _write_config(tmp_path, "dataerror", gradient_accumulation_steps=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(TOY_SCRIPT), str(config), "toy.poison=[]", "toy.unreadable=[5]"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "micro-batch 5 cannot be read (simulated data error on rank 1)" in proc.stderr
    assert "stopping at step 3: 1 other process(es) could not read their data" in proc.stderr
