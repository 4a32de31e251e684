"""``arlow <command>``: the command line over the library.

Parsing needs only the standard library: a command's module - and with it torch and transformers - is imported only
when that command runs, so ``arlow --help``, ``arlow <command> --help`` and every usage error answer at once. This
package lives beside ``arlow`` rather than in it because ``import arlow`` registers the models with transformers'
Auto classes (design D1), which imports torch. Each command module exposes ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path


def _shipped_recipes(stage: str) -> list[str]:
    """Names of the recipes shipped in ``arlow/configs/<stage>/``, found without importing ``arlow``."""
    spec = importlib.util.find_spec("arlow")
    folder = Path(next(iter(spec.submodule_search_locations))) / "configs" / stage
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _recipe_arguments(parser: argparse.ArgumentParser, stage: str, default: str) -> None:
    parser.add_argument("--config", default=None,
                        help=f"recipe YAML, or a shipped recipe name {_shipped_recipes(stage)} (default: {default})")
    parser.add_argument("--resume", default=None, help='"latest" or a checkpoint directory (same as train.resume=...)')
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")


def _pretrain(parser: argparse.ArgumentParser) -> None:
    _recipe_arguments(parser, "pretrain", "tiny_demo, a few minutes on a 2-core CPU with the built-in media")


def _align(parser: argparse.ArgumentParser) -> None:
    _recipe_arguments(parser, "finetune", "align_tiny")


def _sft(parser: argparse.ArgumentParser) -> None:
    _recipe_arguments(parser, "finetune", "sft_tiny")


def _export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint-N/ directory written by `arlow pretrain`")
    parser.add_argument("--output", default=None, help="where to write the export (default: inside the checkpoint)")


def _reconstruct(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a pretraining checkpoint directory (checkpoint-N/) or an MAE model directory")
    parser.add_argument("--inputs", nargs="+", required=True, help="image and/or video files")
    parser.add_argument("--output", default="reconstruction.png", help="PNG file to write")
    parser.add_argument("--resolution", type=int, default=None,
                        help="square side in pixels (multiple of 28); default: the checkpoint's training resolution")
    parser.add_argument("--clip-frames", type=int, default=8, help="frames sampled from each video")
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the model's mask ratio")
    parser.add_argument("--seed", type=int, default=0, help="masking seed")


def _create_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="folder to write (config.json, model.safetensors, processor, tokenizer)")
    parser.add_argument("--preset", help="random weights of a preset size (arlow.assemble.PRESETS: tiny, small)")
    parser.add_argument("--text-only", action="store_true", help="with --preset: write only the ArlowForCausalLM")
    parser.add_argument("--vision-encoder", help="vision_encoder/ export (or the checkpoint-N/ folder holding it)")
    parser.add_argument("--text-model", help="ArlowForCausalLM folder (see python -m arlow.modeling.convert_llm)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the text model's, else the built-in one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the saved weights (default: as built/loaded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random preset weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _probe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("encoder", nargs="?", default=None,
                        help="exported vision_encoder/ folder or pretraining checkpoint-N/ folder")
    parser.add_argument("--random-init", default=None, metavar="CONFIG.json|RECIPE",
                        help="probe a randomly initialised encoder of this config JSON or pretraining recipe instead")
    parser.add_argument("--init-seed", type=int, default=0,
                        help="seed of --random-init (a recipe with its train.seed gives the run's initial encoder)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None,
                      help="class-folder tree, datasets save_to_disk folder, or CSV of path,label (split by --seed)")
    data.add_argument("--train", default=None, help="training split (same forms as --dataset); needs --test")
    data.add_argument("--test", default=None, help="test split (same forms as --dataset); needs --train")
    data.add_argument("--test-fraction", type=float, default=0.2, help="test share of --dataset, per class")
    data.add_argument("--image-column", default="image", help="image column of a datasets folder")
    data.add_argument("--label-column", default="label", help="integer label column of a datasets folder")
    data.add_argument("--split", default="train", help="split of a saved DatasetDict used for --dataset / --train")
    data.add_argument("--test-split", default="test", help="split of a saved DatasetDict used for --test")
    data.add_argument("--resolution", type=int, default=224, help="square side in pixels, a multiple of 28")
    data.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--feature", choices=("merged", "deepstack", "blocks"), default=None,
                            help="pooled feature: deepstack (mean merged output token and each DeepStack level's "
                                 "mean; the default where the encoder has DeepStack levels), merged (the mean merged "
                                 "output token alone; the default otherwise), blocks (mean of the last block, before "
                                 "the merger)")
    evaluation.add_argument("--deepstack", action="store_true", help="the same as --feature deepstack")
    evaluation.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    evaluation.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    evaluation.add_argument("--epochs", type=int, default=None, help="linear probe epochs (default: 50)")
    evaluation.add_argument("--lr", type=float, default=None, help="linear probe peak lr (default: 0.1)")
    evaluation.add_argument("--probe-batch-size", type=int, default=None,
                            help="linear probe mini-batch (default: 256)")
    evaluation.add_argument("--seed", type=int, default=0, help="seeds the split, the linear probe and fine-tuning")
    tuning = parser.add_argument_group("fine-tuning (the encoder + a LayerNorm + Linear head trained end to end)")
    tuning.add_argument("--finetune", action="store_true", help="also run the fine-tuning protocol")
    tuning.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default: 10)")
    tuning.add_argument("--finetune-lr", type=float, default=None, help="peak AdamW lr (default: 5e-4)")
    tuning.add_argument("--finetune-batch-size", type=int, default=None, help="mini-batch (default: 64)")
    tuning.add_argument("--finetune-last-blocks", type=int, default=None, metavar="K",
                        help="partial fine-tuning: only the last K blocks and what follows them train (default: all)")
    parser.add_argument("--output", default="probe_results.json", help="JSON result file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for feature extraction (default: torch's; 1 is often faster on a "
                             "busy machine)")


def _prepare_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: OUT/images and OUT/videos are written")
    parser.add_argument("--config", default=None, help="recipe whose data section names the sources and the crop "
                                                        "(default: tiny_demo); overrides as for `arlow pretrain`")
    parser.add_argument("--images", default=None, help="image source (overrides the recipe's data.images)")
    parser.add_argument("--videos", default=None, help="video source (overrides the recipe's data.videos)")
    parser.add_argument("--no-images", action="store_true", help="prepare only the videos")
    parser.add_argument("--no-videos", action="store_true", help="prepare only the images")
    parser.add_argument("--shard-size", default="1GB", help="about this many bytes per shard (default 1GB)")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="a fixed count instead of --shard-size")
    parser.add_argument("--short-side", type=int, default=None,
                        help="image short side in px (default: the recipe's resolution x 8/7, 256 for 224)")
    parser.add_argument("--max-side", type=int, default=None, help="cap on an image's long side in px")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (default 90)")
    parser.add_argument("--video-short-side", type=int, default=256, help="video short side in px (default 256)")
    parser.add_argument("--fps", default="clip",
                        help="video frame rate: a number, 'source' (the source's, <= 30), or 'clip' (default: the "
                             "rate the recipe's clips sample, source fps / data.frame_stride or data.clip_fps, so a "
                             "clip decodes only the frames it uses)")
    parser.add_argument("--keyframe-interval", type=float, default=1.0, help="seconds between keyframes (<= 1)")
    parser.add_argument("--crf", type=int, default=23, help="x264 quality (default 23)")
    parser.add_argument("--preset", default="veryfast", help="x264 preset (default veryfast)")
    parser.add_argument("--tune", default="fastdecode",
                        help="x264 tune (default fastdecode: the fastest to decode, files ~10%% larger; 'none')")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the item shuffle before sharding")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order in the shards")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.resolution=224")


# command -> (module with ``run(args)``, help, arguments)
COMMANDS = {
    "pretrain": ("arlow.pretrain.run", "MAE pretraining of the vision encoder (no arguments: a tiny demo run)",
                 _pretrain),
    "prepare-data": ("arlow.pretrain.prepare_data",
                     "write prepared shards (resized images, re-encoded videos, indexes)", _prepare_data),
    "export": ("arlow.pretrain.export", "export vision_encoder/ + processors from a pretraining checkpoint", _export),
    "reconstruct": ("arlow.pretrain.reconstruct", "MAE reconstruction grid (PNG) for images or videos", _reconstruct),
    "create-model": ("arlow.assemble", "write a model folder: a preset with random weights, or encoder + text model",
                     _create_model),
    "probe": ("arlow.evaluation.probe", "k-NN and linear-probe accuracy of a vision encoder's frozen features", _probe),
    "align": ("arlow.finetune.align", "stage 2: train the mergers on image/video-caption pairs (loss on captions)",
              _align),
    "sft": ("arlow.finetune.sft", "stage 3: instruction tuning on conversations (full, LoRA or QLoRA)", _sft),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arlow", description="Arlow vision-language models: train, export, evaluate.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(_module=module)
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # Before torch loads OpenMP: idle threads sleep instead of spinning. A spinning pool is what made
    # `arlow pretrain` 8x slower on a busy 2-core host (docs/training.md, "CPU threads"); set the variable to
    # override it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        module = importlib.import_module(args._module)
    except ModuleNotFoundError as err:  # an optional dependency of this command is not installed
        parser.error(f"command {args.command!r} is unavailable: {err}")
    try:
        code = int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyboardInterrupt) as err:  # bad configs and inputs, Ctrl-C: one line
        if args.debug:
            raise
        interrupted = isinstance(err, KeyboardInterrupt)
        print(f"arlow {args.command}: {'' if interrupted else 'error: '}{err or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130 if interrupted else 2
    except RuntimeError as err:
        # looked up, not imported: parsing stays free of torch, and a command that never imported the engine
        # cannot have raised its TrainingStopped
        stopped = getattr(sys.modules.get("arlow.training.engine"), "TrainingStopped", ())
        if args.debug or not isinstance(err, stopped):
            raise
        print(f"arlow {args.command}: {err}", file=sys.stderr)  # NaN/inf losses, a data error on another process
        return 1
    release_process_groups()
    return code


def release_process_groups() -> None:
    """Destroy the process groups a command set up (under ``torchrun``), once it has finished without error. A
    process that exits with a gloo group alive can abort in the interpreter's teardown (``terminate called without
    an active exception``) while gloo's worker threads still hold tensors; after an error the other processes may
    be inside a collective, where destroying would hang, so only a clean finish releases them."""
    dist = sys.modules.get("torch.distributed")  # looked up, not imported: a command that never loaded torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
