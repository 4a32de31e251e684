"""The start-up batch arithmetic of `arlow pretrain` (arlow.pretrain.plan) against hand computations, and the
epochs of a pretraining run: data that repeats with a new shuffle, refusals, exact resume across an epoch."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from arlow.cli import main
from arlow.pretrain.plan import RunPlan, accumulation_for, check_plan
from arlow.pretrain.run import resolve_accumulation

from test_pretrain_run import TINY


def plan(**kw):
    values = dict(samples_per_epoch=1000, micro_batches_per_epoch=400, world_size=8, accumulation=2,
                  tokens_per_batch=4096, max_steps=100, warmup_steps=10, save_every=30, epochs=None)
    values.update(kw)
    return RunPlan(**values)


def test_plan_arithmetic_matches_hand_computation():
    p = plan()
    assert p.micro_batches_per_step == 16 and p.steps_per_epoch == 25.0
    assert p.total_steps == 100 and p.run_epochs == 4.0 and p.warmup_fraction == 0.1
    assert p.checkpoints == [30, 60, 90, 100]
    assert check_plan(p) == []
    text = p.describe()
    for expected in ("1,000 samples per epoch", "400 micro-batches", "25.0 steps per epoch", "100 steps = 4.00 epochs",
                     "warm-up 10 steps = 10.0%", "checkpoints: 4 (30, 60, 90, 100)"):
        assert expected in text, (expected, text)
    # finite data: 3 epochs x 400 micro-batches / 16 per step = 75 whole steps
    assert plan(epochs=3, max_steps=75).available_steps == 75
    assert plan(epochs=3, max_steps=75, save_every=0).checkpoints == [75]


def test_plan_refuses_data_shorter_than_the_run_and_warns_on_likely_mistakes():
    # the model-card recipe before this fix: one epoch of 9,059 steps against max_steps 2.6 M
    with pytest.raises(ValueError, match=r"feeds 75 optimizer steps .* Set data.epochs: null .*max_steps <= 75"):
        check_plan(plan(epochs=3, max_steps=76))
    with pytest.raises(ValueError, match="one optimizer step needs 16"):
        check_plan(plan(epochs=1, micro_batches_per_epoch=10))
    warnings = check_plan(plan(warmup_steps=60, save_every=100))
    assert len(warnings) == 2 and "warm-up is 60%" in warnings[0] and "save_every=100" in warnings[1]
    assert "spans several epochs" in check_plan(plan(micro_batches_per_epoch=8))[0]


def test_tokens_per_step_derives_accumulation():
    assert accumulation_for(65536, 4096, 8) == 2 and accumulation_for(65536, 512, 8) == 16
    with pytest.raises(ValueError, match="use 32,768 or 65,536"):
        accumulation_for(40000, 4096, 8)
    with pytest.raises(ValueError, match="not a whole number"):
        accumulation_for(65536, 4096, 32)  # fewer rows than one round
    tree = {"data": {"tokens_per_batch": 1024, "tokens_per_step": 4096}, "train": {"output_dir": "x"}}
    assert resolve_accumulation(tree, 2)["gradient_accumulation_steps"] == 2
    tree["train"]["gradient_accumulation_steps"] = 3
    with pytest.raises(ValueError, match="contradicts data.tokens_per_step"):
        resolve_accumulation(tree, 2)
    assert resolve_accumulation({"train": {"gradient_accumulation_steps": 3}}, 4)["gradient_accumulation_steps"] == 3


def test_cli_prints_the_plan_and_refuses_finite_data_shorter_than_max_steps(capsys, tmp_path):
    assert main(["pretrain", *TINY, "data.epochs=1", "train.max_steps=50", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.epochs=1 feeds" in err and "train.max_steps=50" in err


@pytest.mark.slow  # ~30 s: 9 steps of the tiny recipe
def test_epochs_repeat_with_new_shuffle_and_resume_mid_epoch_is_exact(tmp_path, capsys):
    """6 steps of ~2 micro-batches per epoch cross two epoch boundaries; resuming from step 3 (mid-epoch) reads
    the same micro-batches as the uninterrupted run."""
    args = [*TINY, "data.num_workers=1", "reconstruct.num_items=0", "train.save_every=3"]
    assert main(["pretrain", *args, "train.max_steps=6", f"train.output_dir={tmp_path / 'full'}"]) == 0
    out = capsys.readouterr().out
    assert "steps per epoch" in out and "epochs repeat with a new shuffle" in out
    state = torch.load(tmp_path / "full" / "checkpoint-6" / "data_state_0.pt")
    assert state["epoch"] >= 2
    mid = torch.load(tmp_path / "full" / "checkpoint-3" / "data_state_0.pt")
    assert mid["position"] > 0  # step 3 ends inside an epoch
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    assert main(["pretrain", *args, "train.max_steps=6", f"train.output_dir={tmp_path / 'cut'}", "--resume",
                 "latest"]) == 0
    full = load_file(str(tmp_path / "full" / "checkpoint-6" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "checkpoint-6" / "model.safetensors"))
    assert full.keys() == cut.keys()
    # The data stream resumes exactly (same micro-batches from step 4 on, across the epoch boundary). The weights
    # agree to ~2e-3, not bitwise: writing a checkpoint draws from the global RNG that the masking noise uses
    # (RNG isolation at checkpoints is issue 15's).
    assert max((full[k] - cut[k]).abs().max().item() for k in full) < 1e-2
    for step in (3, 6):
        a = torch.load(tmp_path / "full" / f"checkpoint-{step}" / "data_state_0.pt")
        b = torch.load(tmp_path / "cut" / f"checkpoint-{step}" / "data_state_0.pt")
        assert a == b
    records = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6
