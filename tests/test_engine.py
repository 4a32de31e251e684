"""Training engine (arlow.training), single process on CPU, against independent computations."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _engine_toy import ToyData, ToyModel, ToySpec, build_model, toy_batch, toy_flops  # noqa: E402

from arlow.training import (  # noqa: E402
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    WarmupCosine,
    apply_overrides,
    build_param_groups,
)
from arlow.training.checkpoint import find_latest_checkpoint, list_checkpoints  # noqa: E402
from arlow.training.distributed import host_process_group  # noqa: E402
from arlow.training.logs import FIELDS, read_log  # noqa: E402
from arlow.training.mfu import measure_matmul_peak  # noqa: E402

TOY_SCRIPT = Path(__file__).parent / "_engine_toy.py"


@pytest.fixture(autouse=True)
def _one_thread():
    # Toy tensors are tiny: on a busy 2-core machine thread wake-ups cost more than the maths.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(tmp_path, **kw):
    values = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        learning_rate=1e-2,
        save_every=0,
        log_every=1,
        progress_bar=False,
        tensorboard=False,
    )
    values.update(kw)
    return TrainConfig(**values)


def train_toy(cfg, spec=None, data=None, **trainer_kw):
    spec = spec or ToySpec()
    trainer = Trainer(cfg, build_model(spec), data if data is not None else ToyData(spec), **trainer_kw)
    return trainer, trainer.train()


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def ckpt_weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


class ListData:
    """A fixed list of micro-batches, resumable by position (cycles when exhausted)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield dict(self.batches[self.position - 1])
        self.position = 0


# ---------------------------------------------------------------- schedule, param groups, config


def test_warmup_cosine_matches_hand_computation():
    f = WarmupCosine(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    cos = lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    expected = [0.5, 1.0, 1.0, cos(0.25), cos(0.5), cos(0.75)]
    assert [f(s) for s in range(6)] == pytest.approx(expected, abs=1e-12)
    assert cos(0.5) == pytest.approx(0.55)
    g = WarmupCosine(0, 4, 0.0)
    assert [g(s) for s in range(4)] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)])


def test_param_groups_split_1d_params_and_validate():
    model = ToyModel()
    groups = build_param_groups(
        model, 1e-3, 0.05, [{"params": model.fc1.parameters(), "lr": 2e-3}, {"params": [*model.norm.parameters(), *model.fc2.parameters()]}]
    )
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"group0.decay", "group0.no_decay", "group1.decay", "group1.no_decay"}
    assert by_name["group0.decay"]["params"] == [model.fc1.weight]
    assert by_name["group0.no_decay"]["params"] == [model.fc1.bias]
    assert by_name["group1.no_decay"]["params"] == [model.norm.weight, model.norm.bias, model.fc2.bias]
    assert [by_name[n]["weight_decay"] for n in ("group0.decay", "group0.no_decay", "group1.decay")] == [0.05, 0.0, 0.05]
    assert by_name["group0.decay"]["lr"] == by_name["group0.no_decay"]["lr"] == 2e-3
    assert by_name["group1.decay"]["lr"] == 1e-3

    with pytest.raises(ValueError, match="more than one param group"):
        build_param_groups(model, 1e-3, 0.0, [{"params": model.parameters()}, {"params": [model.fc1.weight]}])
    with pytest.raises(ValueError, match="in no param group.*fc2.weight"):
        build_param_groups(model, 1e-3, 0.0, [{"params": [*model.fc1.parameters(), *model.norm.parameters(), model.fc2.bias]}])
    model.fc2.weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in build_param_groups(model, 1e-3, 0.0)) == 5  # frozen weight left out


class ZeroGradModel(ToyModel):
    """Loss with an exactly-zero gradient: AdamW's update is then pure decoupled weight decay, p *= 1 - lr * wd."""

    def forward(self, x, y, poison=None):
        out = super().forward(x, y)
        return {"loss": out["pred"].sum() * 0.0}


def test_engine_applies_per_group_lr_and_decay_only_to_2d_params(tmp_path):
    model = ZeroGradModel()
    before = copy.deepcopy(model.state_dict())
    groups = [
        {"params": model.fc1.parameters(), "lr": 0.1, "weight_decay": 0.5},
        {"params": [*model.norm.parameters(), *model.fc2.parameters()], "lr": 0.02},
    ]
    cfg = make_config(tmp_path, max_steps=1, weight_decay=0.25)
    trainer = Trainer(cfg, model, ToyData(ToySpec()), param_groups=groups)
    trainer.train()
    after = weights(trainer)
    assert torch.allclose(after["fc1.weight"], before["fc1.weight"] * (1 - 0.1 * 0.5), atol=0, rtol=1e-6)
    assert torch.allclose(after["fc2.weight"], before["fc2.weight"] * (1 - 0.02 * 0.25), atol=0, rtol=1e-6)
    for name in ("fc1.bias", "norm.weight", "norm.bias", "fc2.bias"):
        assert torch.equal(after[name], before[name]), name


def test_config_from_yaml_with_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  output_dir: out\n  max_steps: 10\n  learning_rate: 1e-4\nmodel:\n  depth: 2\n")
    cfg = TrainConfig.from_yaml(
        path, ["train.learning_rate=3e-4", "train.betas=[0.9,0.99]", "train.max_grad_norm=null", "train.save_every=5"], section="train"
    )
    assert (cfg.learning_rate, cfg.betas, cfg.max_grad_norm, cfg.save_every, cfg.max_steps) == (3e-4, (0.9, 0.99), None, 5, 10)
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=x"]) == {"a": {"b": 1, "c": {"d": "x"}}}
    with pytest.raises(ValueError, match="Did you mean 'learning_rate'"):
        TrainConfig.from_dict({"output_dir": "o", "max_steps": 1, "learning_rat": 1e-3})
    with pytest.raises(ValueError, match="precision.*one of"):
        TrainConfig(output_dir="o", max_steps=1, precision="fp8")
    with pytest.raises(ValueError, match="max_steps='ten'.*integer"):
        TrainConfig.from_dict({"output_dir": "o", "max_steps": "ten"})
    with pytest.raises(ValueError, match="needs output_dir"):
        TrainConfig.from_dict({"max_steps": 3})
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])
    for key in ("learning_rate", "weight_decay", "adam_eps", "max_grad_norm", "peak_flops"):
        with pytest.raises(ValueError, match=f"TrainConfig.{key}=inf is invalid: expected a finite"):
            TrainConfig.from_dict({"output_dir": "o", "max_steps": 3, key: "inf"})
    with pytest.raises(ValueError, match="deepspeed_config.*not a file"):
        TrainConfig(output_dir="o", max_steps=3, deepspeed_config=str(tmp_path / "missing.json"))


def test_warmup_longer_than_the_run_is_clamped_with_a_notice(caplog):
    with caplog.at_level("WARNING", logger="arlow.training"):
        cfg = TrainConfig(output_dir="o", max_steps=4, warmup_steps=30)
    assert cfg.warmup_steps == 4
    assert [r.getMessage() for r in caplog.records] == [
        "arlow: warmup_steps=30 exceeds max_steps=4; warming up over all 4 steps (lower train.warmup_steps to "
        "silence this)"]
    assert WarmupCosine(cfg.warmup_steps, 4)(3) == 1.0  # the last step reaches the peak lr


def test_cpu_training_tells_deepspeed_its_accelerator(tmp_path):
    pytest.importorskip("deepspeed")
    code = ("import torch; from arlow.training import TrainConfig; from arlow.training.distributed import "
            "build_accelerator; build_accelerator(TrainConfig(output_dir='o', max_steps=1), torch.nn.Linear(2, 2)); "
            "from deepspeed.accelerator import get_accelerator; print(get_accelerator().device_name())")
    env = {k: v for k, v in _toy_env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr[-2000:]
    assert "Setting accelerator to CPU" not in proc.stderr  # no warning to cut through the progress bar


def test_fsdp_launch_with_a_deepspeed_config_is_refused(monkeypatch):
    """An FSDP accelerate config plus train.deepspeed_config (the model_card recipe's zero2) is one launcher too many;
    accelerate would keep one of them silently."""
    from arlow.training.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="train.deepspeed_config=null for FSDP"):
        build_accelerator(TrainConfig(output_dir="o", max_steps=1, deepspeed_config="zero2"), torch.nn.Linear(2, 2))


def test_fp16_refused_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="fp16' needs a GPU"):
        Trainer(make_config(tmp_path, precision="fp16"), build_model(ToySpec()), ToyData(ToySpec()))


def test_data_without_state_dict_refused(tmp_path):
    with pytest.raises(ValueError, match="state_dict"):
        Trainer(make_config(tmp_path), build_model(ToySpec()), [toy_batch(0, ToySpec())])


# ---------------------------------------------------------------- accumulation, clipping, precision


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    spec = ToySpec(batch=4)
    micro = [toy_batch(i, spec) for i in range(12)]
    big = [{k: torch.cat([m[k] for m in micro[i : i + 4]]) for k in ("x", "y")} for i in range(0, 12, 4)]
    # adam_eps=1 makes the update depend on the gradient's scale, so a wrong 1/k would show.
    common = dict(max_steps=3, adam_eps=1.0, max_grad_norm=None)
    t_acc, _ = train_toy(make_config(tmp_path / "a", gradient_accumulation_steps=4, **common), spec, ListData(micro))
    t_big, _ = train_toy(make_config(tmp_path / "b", gradient_accumulation_steps=1, **common), spec, ListData(big))
    t_one, _ = train_toy(make_config(tmp_path / "c", gradient_accumulation_steps=1, **common), spec, ListData(micro))
    w_acc, w_big, w_one = weights(t_acc), weights(t_big), weights(t_one)
    for name in w_big:
        assert torch.allclose(w_acc[name], w_big[name], atol=1e-6, rtol=0), name
    assert max((w_one[n] - w_big[n]).abs().max().item() for n in w_big) > 1e-4  # the comparison can fail


def test_on_device_hook_is_the_first_op_of_each_micro_batch(tmp_path):
    """Training on uint8-coded inputs that ``on_device`` decodes equals training on the decoded floats (and without
    the hook the uint8 batch could not train): the hook runs on every micro-batch, on the training device."""
    spec = ToySpec(batch=4)
    coded = [{"x": (b["x"] * 40 + 128).round().clamp(0, 255).to(torch.uint8), "y": b["y"]}
             for b in (toy_batch(i, spec) for i in range(6))]
    decoded = [{"x": (b["x"].float() - 128) / 40, "y": b["y"]} for b in coded]
    seen = []

    def decode(inputs):
        seen.append((inputs["x"].dtype, inputs["x"].device.type))
        return {**inputs, "x": (inputs["x"].float() - 128) / 40}

    common = dict(max_steps=3, gradient_accumulation_steps=2)
    t_hook, _ = train_toy(make_config(tmp_path / "a", **common), spec, ListData(coded), on_device=decode)
    t_float, _ = train_toy(make_config(tmp_path / "b", **common), spec, ListData(decoded))
    assert seen == [(torch.uint8, t_hook.accelerator.device.type)] * 6
    w_hook, w_float = weights(t_hook), weights(t_float)
    for name in w_float:
        assert torch.equal(w_hook[name], w_float[name]), name
    with pytest.raises(RuntimeError):
        train_toy(make_config(tmp_path / "c", **common), spec, ListData(coded))


def manual_step(model, batch, lr, wd, eps, clip):
    """One AdamW step written without the engine: autograd, torch clipping, decay on 2-D params only."""
    model = copy.deepcopy(model)
    model(**batch)["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=eps)
    opt.step()
    return model.state_dict(), float(norm)


@pytest.mark.parametrize("clip", [0.05, None])
def test_gradient_clipping_matches_manual_step(tmp_path, clip):
    spec = ToySpec()
    batch = toy_batch(0, spec)
    expected, norm = manual_step(build_model(spec), batch, lr=0.01, wd=0.05, eps=1.0, clip=clip)
    assert norm > 0.5  # well above the threshold: clipping changes the gradient 10x
    cfg = make_config(tmp_path, max_steps=1, adam_eps=1.0, max_grad_norm=clip)
    trainer, _ = train_toy(cfg, spec, ListData([batch]))
    got = weights(trainer)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-7, rtol=0), name
    record = read_log(Path(cfg.output_dir) / "log.jsonl")[0]
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-6)  # logged norm is the pre-clip norm
    if clip:
        unclipped, _ = manual_step(build_model(spec), batch, lr=0.01, wd=0.05, eps=1.0, clip=None)
        assert (unclipped["fc1.weight"] - got["fc1.weight"]).abs().max() > 1e-4


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    spec = ToySpec(hidden=64)
    t32, s32 = train_toy(make_config(tmp_path / "fp32", max_steps=3), spec)
    t16, s16 = train_toy(make_config(tmp_path / "bf16", max_steps=3, precision="bf16"), spec)
    w32, w16 = weights(t32), weights(t16)
    assert all(v.dtype == torch.float32 for v in w16.values())  # autocast keeps fp32 master weights
    diff = max((w32[n] - w16[n]).abs().max().item() for n in w32)
    assert 0 < diff < 2e-2  # bf16 matmuls were used (not identical) and the result is close
    assert s16["last_step_loss"] == pytest.approx(s32["last_step_loss"], rel=0.05)


# ---------------------------------------------------------------- non-finite losses


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    # k=2: ordinal 5 is the 2nd micro-batch of step 3; ordinal 8 the 1st of step 5 (its 2nd is dropped unseen).
    spec = ToySpec(poison=[5, 8])
    cfg = make_config(tmp_path, max_steps=6, gradient_accumulation_steps=2, save_every=1, keep_last=0)
    trainer, summary = train_toy(cfg, spec)
    assert summary["nonfinite_skipped"] == 2 and summary["step"] == 6
    ck = {step: ckpt_weights(path) for step, path in list_checkpoints(cfg.output_dir)}
    assert sorted(ck) == [1, 2, 3, 4, 5, 6]
    same = lambda a, b: all(torch.equal(ck[a][n], ck[b][n]) for n in ck[a])  # noqa: E731
    assert same(2, 3) and same(4, 5)  # skipped steps changed nothing
    assert not same(1, 2) and not same(3, 4) and not same(5, 6)
    assert all(torch.isfinite(t).all() for w in ck.values() for t in w.values())
    records = read_log(Path(cfg.output_dir) / "log.jsonl")
    assert [r["nonfinite_skipped"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert records[2]["loss"] is None and records[3]["loss"] is not None
    data_state = torch.load(Path(cfg.output_dir) / "checkpoint-6" / "data_state_0.pt")
    assert data_state["epoch"] * 12 + data_state["position"] == 12  # every micro-batch consumed, bad ones too


def test_persistent_nonfinite_loss_stops_with_message(tmp_path):
    spec = ToySpec(poison=list(range(4, 100)))
    cfg = make_config(tmp_path, max_steps=20, save_every=1, keep_last=0, max_consecutive_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf for 3 steps in a row \(5..7.*checkpoint-6.*--resume latest"):
        train_toy(cfg, spec)
    steps = [s for s, _ in list_checkpoints(cfg.output_dir)]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing after the stop
    w4, w6 = ckpt_weights(Path(cfg.output_dir) / "checkpoint-4"), ckpt_weights(Path(cfg.output_dir) / "checkpoint-6")
    assert all(torch.equal(w4[n], w6[n]) and torch.isfinite(w6[n]).all() for n in w4)
    assert read_log(Path(cfg.output_dir) / "log.jsonl")[-1]["nonfinite_skipped"] == 3


def test_checkpoint_refuses_nonfinite_weights(tmp_path):
    trainer, _ = train_toy(make_config(tmp_path, max_steps=1))
    with torch.no_grad():
        trainer.accelerator.unwrap_model(trainer.model).fc1.weight[0, 0] = float("nan")
    trainer.step = 2
    with pytest.raises(RuntimeError, match="refusing to write checkpoint-2"):
        trainer.save_checkpoint()
    assert [s for s, _ in list_checkpoints(trainer.config.output_dir)] == [1]


# ---------------------------------------------------------------- logs, hooks, checkpoints


def test_json_log_fields_tensorboard_hook_and_pruning(tmp_path):
    spec = ToySpec()
    calls = []

    def hook(path, model):
        # inside the temporary folder, before trainer_state.json and the rename: the hook's files are part of it
        calls.append((Path(path).name, (Path(path) / "trainer_state.json").is_file(), type(model).__name__))

    cfg = make_config(tmp_path, max_steps=5, warmup_steps=2, min_lr_ratio=0.1, save_every=2, keep_last=2, tensorboard=True)
    train_toy(cfg, spec, flops_per_batch=toy_flops(spec), on_checkpoint=hook)
    records = read_log(Path(cfg.output_dir) / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    schedule = WarmupCosine(2, 5, 0.1)
    for i, r in enumerate(records):
        assert set(r) == set(FIELDS)
        assert r["lr"] == pytest.approx(1e-2 * schedule(i), rel=1e-12)
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0
        assert r["loss_scale"] is None and r["nonfinite_skipped"] == 0 and r["overflow_skipped"] == 0
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * spec.d_in, rel=1e-9)
        assert r["samples_per_s"] == pytest.approx(spec.batch / r["step_time"], rel=1e-6)
        assert 0 < r["mfu"] < 1 and r["step_time"] > 0
        flops = toy_flops(spec)(toy_batch(0, spec))  # per micro-batch; the engine measured (and cached) this peak:
        assert r["mfu"] == pytest.approx(flops / r["step_time"] / measure_matmul_peak(torch.float32, "cpu"), rel=1e-6)
    assert all(a["elapsed"] < b["elapsed"] for a, b in zip(records, records[1:]))
    assert list((Path(cfg.output_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert calls == [(f".tmp-checkpoint-{s}", False, "ToyModel") for s in (2, 4, 5)]
    assert [s for s, _ in list_checkpoints(cfg.output_dir)] == [4, 5]  # keep_last=2


def test_checkpoint_appears_only_with_what_its_hook_wrote_and_resume_prunes(tmp_path):
    def hook(path, model):
        if path.name.endswith("-4"):
            raise OSError("killed while exporting (simulated)")
        (path / "export.txt").write_text(path.name)

    cfg = make_config(tmp_path, max_steps=6, save_every=2, keep_last=0)
    with pytest.raises(OSError, match="simulated"):
        train_toy(cfg, on_checkpoint=hook)
    out = Path(cfg.output_dir)
    assert [s for s, _ in list_checkpoints(out)] == [2] and not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-2" / "export.txt").read_text() == ".tmp-checkpoint-2"

    _, summary = train_toy(make_config(tmp_path, max_steps=6, save_every=1, keep_last=0, resume="latest"))
    assert summary["resumed_from"].endswith("checkpoint-2") and len(list_checkpoints(out)) == 5
    # killed after the last rename, before pruning: the resumed run prunes first, even with nothing left to train
    (out / ".trash-checkpoint-2").mkdir()  # and a crash mid-delete left a trash folder behind
    (out / ".trash-checkpoint-2" / "x").write_text("x")
    with pytest.warns(UserWarning, match="changed settings.*keep_last"):
        train_toy(make_config(tmp_path, max_steps=6, save_every=1, keep_last=2, resume="latest"))
    assert [s for s, _ in list_checkpoints(out)] == [5, 6]


def test_skipped_files_reach_the_summary_log_and_trainer_state(tmp_path):
    class SkippingData(ToyData):
        @property
        def num_skipped_files(self):  # as PretrainData counts them: one more unreadable file every 3 micro-batches
            return (self.epoch * self.local_len + self.position) // 3

    cfg = make_config(tmp_path, max_steps=4, save_every=2, keep_last=0)
    _, summary = train_toy(cfg, data=SkippingData(ToySpec()))
    records = read_log(Path(cfg.output_dir) / "log.jsonl")
    assert summary["skipped_files"] == 1 and summary["last_step_loss"] == summary["last_logged_loss"]  # log_every=1
    assert summary["last_logged_loss"] == records[-1]["loss"]
    assert [r["skipped_files"] for r in records] == [0, 0, 1, 1]
    states = [json.loads((Path(cfg.output_dir) / f"checkpoint-{s}" / "trainer_state.json").read_text()) for s in (2, 4)]
    assert [s["skipped_files"] for s in states] == [0, 1]
    _, plain = train_toy(make_config(tmp_path / "plain"))
    assert plain["skipped_files"] is None  # data that does not count skips


def test_crash_while_writing_checkpoint_leaves_previous_and_resume_is_exact(tmp_path):
    spec = ToySpec(dropout=0.1)  # dropout: exact resume also needs the RNG states
    common = dict(max_steps=6, gradient_accumulation_steps=2, save_every=2, keep_last=0)
    reference, _ = train_toy(make_config(tmp_path / "ref", **common), spec)

    class CrashingData(ToyData):
        calls = 0

        def state_dict(self):
            CrashingData.calls += 1
            if CrashingData.calls == 2:  # the 2nd checkpoint dies after model/optimizer/RNG files were written
                raise OSError("disk full (simulated)")
            return super().state_dict()

    cfg = make_config(tmp_path / "crash", **common)
    with pytest.raises(OSError, match="simulated"):
        train_toy(cfg, spec, CrashingData(spec))
    out = Path(cfg.output_dir)
    tmp = out / ".tmp-checkpoint-4"
    assert (tmp / "model.safetensors").is_file() and not (out / "checkpoint-4").exists()
    assert find_latest_checkpoint(out) == out / "checkpoint-2"

    resumed, summary = train_toy(make_config(tmp_path / "crash", resume="latest", **common), spec)
    assert summary["resumed_from"] == str(out / "checkpoint-2") and summary["step"] == 6
    assert not tmp.exists()
    ref_w, got_w = weights(reference), weights(resumed)
    assert all(torch.equal(ref_w[n], got_w[n]) for n in ref_w)
    ref_log = read_log(tmp_path / "ref" / "run" / "log.jsonl")
    got_log = read_log(out / "log.jsonl")
    assert [r["loss"] for r in got_log] == [r["loss"] for r in ref_log]  # steps 3..6 rewritten identically


def test_resume_resolution(tmp_path):
    cfg = make_config(tmp_path, max_steps=2, resume="latest", save_every=1)
    _, summary = train_toy(cfg)  # nothing to resume yet: a fresh run
    assert summary["resumed_from"] is None
    with pytest.warns(UserWarning, match="changed settings.*max_steps"):  # a longer run: the cosine stretches
        _, summary = train_toy(make_config(tmp_path, max_steps=3, resume=str(Path(cfg.output_dir) / "checkpoint-1")))
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["step"] == 3
    with pytest.raises(ValueError, match="not a directory"):
        train_toy(make_config(tmp_path, resume=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume latest"):
        train_toy(make_config(tmp_path, max_steps=3))  # a fresh run must not mix with an earlier one
    bogus = tmp_path / "checkpoint-9"
    bogus.mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train_toy(make_config(tmp_path, resume=str(bogus)))


class _Payload:
    """Unpickling this creates ``marker``: the code a tampered checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("planted", ["scheduler.pt", "data_state_0.pt", "random_states_0.pkl", "optimizer.bin"])
def test_resume_refuses_a_planted_pickle_payload(tmp_path, planted):
    cfg = make_config(tmp_path, max_steps=2, save_every=2)
    train_toy(cfg)
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, Path(cfg.output_dir) / "checkpoint-2" / planted)
    where = planted if planted != "optimizer.bin" else "the accelerate state in .*optimizer.bin"
    with pytest.raises(ValueError, match=f"refusing to load .*{where}.*could run code \\(it calls "):
        train_toy(make_config(tmp_path, max_steps=3, resume="latest"))
    assert not marker.exists()


def _toy_yaml(path, output_dir, **train):
    lines = ["train:", f"  output_dir: {output_dir}", "  progress_bar: false", "  tensorboard: false"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in train.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toy_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A run killed with SIGKILL mid-way and resumed from its last checkpoint ends with the same bits as an
    uninterrupted run (same machine, fp32, one process; dropout on, so the RNG states must be restored too)."""
    train = dict(max_steps=12, learning_rate=1e-2, gradient_accumulation_steps=2, save_every=3, log_every=1, keep_last=2)
    run_yaml = _toy_yaml(tmp_path / "run.yaml", tmp_path / "run", **train)
    cmd = [sys.executable, str(TOY_SCRIPT), str(run_yaml), "toy.dropout=0.1"]
    env = _toy_env()

    victim = subprocess.Popen(cmd + ["toy.delay=0.05"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while find_latest_checkpoint(tmp_path / "run") is None and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[-3000:]
    killed_at = find_latest_checkpoint(tmp_path / "run")
    assert killed_at is not None and not (tmp_path / "run" / "final.safetensors").exists()

    resumed = subprocess.run(cmd + ["train.resume=latest"], env=env, capture_output=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["step"] == 12

    # The uninterrupted reference runs here, in-process: same code, same single thread, so the same bits.
    spec = ToySpec(dropout=0.1)
    reference, _ = train_toy(make_config(tmp_path / "ref", **train), spec)
    ref_w, got_w = weights(reference), load_file(str(tmp_path / "run" / "final.safetensors"))
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[n], got_w[n]) for n in ref_w)
    ref_log, got_log = read_log(tmp_path / "ref" / "run" / "log.jsonl"), read_log(tmp_path / "run" / "log.jsonl")
    assert [(r["step"], r["loss"], r["lr"]) for r in got_log] == [(r["step"], r["loss"], r["lr"]) for r in ref_log]


# ---------------------------------------------------------------- FLOP accounting


def test_measured_peak():
    rng = torch.get_rng_state()
    peak = measure_matmul_peak(torch.float32, "cpu", size=256)
    assert torch.equal(rng, torch.get_rng_state())  # measuring must not move the global RNG (exact resume)
    assert 1e8 < peak < 1e14
    assert measure_matmul_peak(torch.float32, "cpu", size=256) == peak  # cached


# ---------------------------------------------------------------- DeepSpeed JSON handling (no DeepSpeed run here)


def test_shipped_deepspeed_configs_resolve_and_fill(tmp_path):
    from arlow.training.distributed import resolve_deepspeed_config

    root = Path(__file__).resolve().parents[1]
    for name in ("zero2", "zero3"):
        shipped = Path(TrainConfig(output_dir="o", max_steps=1, deepspeed_config=name).deepspeed_config)
        # configs/ at the repository root is a link to the packaged src/arlow/configs/: one copy of each file
        assert shipped.resolve() == (root / "configs" / "deepspeed" / f"{name}.json").resolve()
    from accelerate.commands.config.config_args import load_config_from_file

    launch = {n: load_config_from_file(str(root / "configs" / "accelerate" / f"{n}.yaml")) for n in ("multi_gpu", "deepspeed_zero2", "fsdp")}
    assert [c.distributed_type.name for c in launch.values()] == ["MULTI_GPU", "DEEPSPEED", "FSDP"]
    assert (root / launch["deepspeed_zero2"].deepspeed_config["deepspeed_config_file"]).is_file()
    cfg = TrainConfig(output_dir="o", max_steps=1, deepspeed_config="zero3", gradient_accumulation_steps=4, max_grad_norm=0.5)
    ds = resolve_deepspeed_config(cfg.deepspeed_config, cfg, ToyModel())
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"], ds["train_micro_batch_size_per_gpu"]) == (4, 0.5, 1)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert ds["bf16"]["enabled"] == "auto"  # accelerate fills precision from TrainConfig.precision
    no_clip = resolve_deepspeed_config(cfg.deepspeed_config, TrainConfig(output_dir="o", max_steps=1, max_grad_norm=None), None)
    assert no_clip["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="defines 'optimizer'"):
        resolve_deepspeed_config({"optimizer": {"type": "AdamW"}}, cfg, None)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=8.*TrainConfig.gradient_accumulation_steps=4"):
        resolve_deepspeed_config({"gradient_accumulation_steps": 8}, cfg, None)
    with pytest.raises(ValueError, match="fp16.enabled=True.*precision='fp32'"):
        resolve_deepspeed_config({"fp16": {"enabled": True}}, cfg, None)


# ---------------------------------------------------------------- host syncs


def test_the_data_error_flag_goes_over_a_host_group_when_the_default_group_is_on_the_device(tmp_path, monkeypatch):
    """With several processes every micro-batch reduces a "could not read my data" flag. Under NCCL that reduce,
    read back, would wait for the queued kernels; so a gloo group carries it. A one-process gloo world stands in
    for NCCL here (the backend query patched): the helper then makes a new gloo group that reduces CPU tensors."""
    get_backend = torch.distributed.get_backend
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        assert host_process_group() is torch.distributed.group.WORLD  # gloo already: no second group
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
        group = host_process_group()
        assert group is not torch.distributed.group.WORLD and get_backend(group) == "gloo"
        flag = torch.tensor([1.0])
        torch.distributed.all_reduce(flag, group=group)
        assert flag.item() == 1.0
    finally:
        torch.distributed.destroy_process_group()


def test_a_step_reads_the_device_once_whatever_the_accumulation(tmp_path, monkeypatch):
    """No host read per micro-batch: an unlogged step makes one (is the global gradient norm finite?), whatever
    gradient_accumulation_steps is; losses and norms are read when a record is logged. A spy counts every
    .item()/.cpu()/.tolist()/bool()/float()/int() on a tensor made outside torch itself (torch's AdamW reads its
    CPU step counters, which is no device sync) and outside the toy model (whose poison switch is a host read)."""
    skip_dirs = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    counting, calls = [False], []
    for name in ("item", "cpu", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if counting[0] and not caller.startswith(skip_dirs):
                calls.append(f"{_name} @ {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    per_step = {}
    for k in (1, 4):
        cfg = make_config(tmp_path / f"k{k}", max_steps=3, log_every=100, gradient_accumulation_steps=k)
        trainer = Trainer(cfg, build_model(ToySpec()), ToyData(ToySpec()))
        step = trainer._train_step

        def counted_step(timed=False, _step=step, _k=k):
            counting[0] = True
            try:
                return _step()
            finally:
                counting[0] = False
                per_step.setdefault(_k, []).append(list(calls))
                calls.clear()

        trainer._train_step = counted_step
        summary = trainer.train()
        assert summary["step"] == 3 and math.isfinite(summary["last_step_loss"])
    # steps 1 and 2 are not logged (log_every=100); step 3 is the last, timed and logged
    for k in (1, 4):
        assert [len(c) for c in per_step[k][:2]] == [1, 1], per_step[k]
        assert per_step[k][0][0].startswith("__bool__ @ engine.py")
