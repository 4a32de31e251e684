"""The pretraining entry point end to end on the built-in media (short), export, reconstruction and the CLI."""

import json

import pytest
import torch
from transformers import AutoModel

import arlow  # noqa: F401
from arlow.cli import main
from arlow.modeling.vision import ArlowVLVisionModel
from arlow.pretrain.export import load_mae_checkpoint
from arlow.pretrain.run import load_recipe

TINY = ["model.vision.embed_dim=64", "model.vision.hidden_size=64", "model.decoder_hidden_size=64",
        "model.decoder_num_layers=1", "data.resolution=56", "data.clip_frames=4", "data.tokens_per_batch=256",
        "data.num_workers=0", "train.warmup_steps=1", "train.log_every=1", "train.precision=fp32",
        "reconstruct.num_items=2"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    code = main(["pretrain", *TINY, "train.max_steps=4", "train.save_every=2", f"train.output_dir={out}"])
    assert code == 0
    return out


def test_recipes_load_and_validate():
    for name in ("tiny_demo", "model_card"):
        tree = load_recipe(name)
        assert set(tree) == {"model", "data", "train", "reconstruct"}
    assert load_recipe("tiny_demo", ["train.max_steps=7"])["train"]["max_steps"] == 7
    with pytest.raises(ValueError, match="unknown recipe sections"):
        load_recipe("tiny_demo", ["trian.max_steps=7"])
    typos = {"data.resolutoin=56": "unknown data key 'resolutoin'. Did you mean 'resolution'?",
             "model.vision.depht=2": "unknown model.vision key 'depht'. Did you mean 'depth'?",
             "model.mask_ration=0.5": "unknown model key 'mask_ration'. Did you mean 'mask_ratio'?",
             "reconstruct.num_item=2": "unknown reconstruct key 'num_item'. Did you mean 'num_items'?",
             "train.max_step=2": "unknown train key 'max_step'. Did you mean 'max_steps'?"}
    for override, message in typos.items():
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("?", r"\?")):
            load_recipe("tiny_demo", [override])


def test_cli_reports_bad_config_without_traceback(capsys, tmp_path):
    assert main(["pretrain", "train.learning_rate=inf", "train.max_steps=2", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate=inf is invalid" in err and "Traceback" not in err


def test_run_writes_checkpoints_exports_and_reconstructions(demo_run):
    records = [json.loads(line) for line in (demo_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["mfu"] > 0 and r["tokens_per_s"] > 0 for r in records)
    for step in (2, 4):
        ckpt = demo_run / f"checkpoint-{step}"
        for name in ("vision_encoder/config.json", "vision_encoder/model.safetensors", "image_processor",
                     "video_processor", "processor_config.json", "mae_decoder/decoder.safetensors", "README.md",
                     "reconstructions.png"):
            assert (ckpt / name).exists(), name
    # every grid is kept beside the checkpoints, and the run ends with the first beside the last
    from PIL import Image

    grids = [Image.open(demo_run / f"reconstructions-step-{step}.png") for step in (2, 4)]
    both = Image.open(demo_run / "reconstructions_first_vs_last.png")
    assert both.width == grids[0].width + 12 + grids[1].width and both.height == 16 + grids[0].height
    assert both.crop((0, 16, grids[0].width, both.height)).tobytes() == grids[0].convert("RGB").tobytes()
    right = both.crop((grids[0].width + 12, 16, both.width, both.height))
    assert right.tobytes() == grids[1].convert("RGB").tobytes()
    for part in ("vision_encoder", "image_processor", "video_processor", "mae_decoder"):  # readable by others
        folder = demo_run / "checkpoint-4" / part
        assert folder.stat().st_mode & 0o777 == 0o755, part
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in folder.iterdir()), part


def test_export_loads_with_identical_outputs(demo_run):
    ckpt = demo_run / "checkpoint-4"
    mae, meta = load_mae_checkpoint(ckpt)
    assert meta["step"] == 4
    direct = ArlowVLVisionModel.from_pretrained(ckpt / "vision_encoder").eval()
    auto = AutoModel.from_pretrained(ckpt / "vision_encoder").eval()
    pv = torch.randn(2 * 4 * 4, mae.config.vision_config.patch_dim)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    ref = mae.encoder(pv, grid).last_hidden_state
    assert torch.equal(direct(pv, grid).last_hidden_state, ref)
    assert torch.equal(auto(pv, grid).last_hidden_state, ref)
    # the engine state alone (its config.json + model.safetensors) rebuilds the same model as the export
    state = {k: v for k, v in mae.state_dict().items()}
    (ckpt / "copy").mkdir()
    for f in ("config.json", "model.safetensors"):
        (ckpt / "copy" / f).write_bytes((ckpt / f).read_bytes())
    again, _ = load_mae_checkpoint(ckpt / "copy")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    assert main(["export", str(ckpt / "copy")]) == 0
    exported = ArlowVLVisionModel.from_pretrained(ckpt / "copy" / "vision_encoder").eval()
    assert torch.equal(exported(pv, grid).last_hidden_state, ref)


def test_export_and_reconstruct_commands(demo_run, tmp_path):
    from PIL import Image

    ckpt = demo_run / "checkpoint-4"
    assert main(["export", str(ckpt), "--output", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "vision_encoder" / "model.safetensors").is_file()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(tmp_path / "red.png")
    png = tmp_path / "grid.png"
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--inputs", str(tmp_path / "red.png"), "--output",
                 str(png)]) == 0
    grid = Image.open(png)
    assert grid.width > 4 * 56 and grid.height >= 56


def test_resume_continues(demo_run):
    code = main(["pretrain", *TINY, "train.max_steps=6", "train.save_every=2", f"train.output_dir={demo_run}",
                 "--resume", "latest"])
    assert code == 0
    records = [json.loads(line) for line in (demo_run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and (demo_run / "checkpoint-6" / "vision_encoder").is_dir()


def test_reconstruct_checks_inputs_before_loading_weights(tmp_path, capsys):
    # the checkpoint does not exist either: the inputs are checked first, and the answer is a usage error (2)
    assert main(["reconstruct", "--checkpoint", str(tmp_path / "nope"), "--inputs", str(tmp_path / "missing.jpg")]) == 2
    err = capsys.readouterr().err
    assert "missing.jpg: does not exist" in err and "nope" not in err


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_and_nonfinite_stop_say_one_line_with_the_last_checkpoint(tmp_path, capsys, monkeypatch, debug):
    from arlow.training import NonFiniteLossError, Trainer, TrainingInterrupted
    from arlow.training.engine import _StepResult

    step = Trainer._train_step

    def interrupted_at_3(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)

    def nan_from_3(self):
        return _StepResult(nonfinite=True) if self.step >= 2 else step(self)

    run = ["pretrain", *TINY, "train.max_steps=6", "train.save_every=2", "train.progress_bar=false",
           "train.max_consecutive_nonfinite=2"]
    run[1:1] = ["--debug"] if debug else []
    for hook, code, error, words in ((interrupted_at_3, 130, TrainingInterrupted, "interrupted (Ctrl-C) during step 3"),
                                     (nan_from_3, 1, NonFiniteLossError, "training stopped at step 4: the loss or gradient was NaN/inf for 2 steps")):
        monkeypatch.setattr(Trainer, "_train_step", hook)
        out = tmp_path / hook.__name__
        if debug:  # the exception itself, with its traceback
            with pytest.raises(error):
                main(run + [f"train.output_dir={out}"])
            continue
        assert main(run + [f"train.output_dir={out}"]) == code
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"arlow pretrain: {words}")
        assert f"Last checkpoint: {out / 'checkpoint-2'}" in err and err.endswith("--resume latest.")
