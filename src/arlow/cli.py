"""``arlow <command>``: the command-line roof over the library. Each command lives in its own module and is
imported only when it runs, so ``arlow --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help). Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "pretrain": ("arlow.pretrain.run", "MAE pretraining of the vision encoder (no arguments: a tiny demo run)"),
    "export": ("arlow.pretrain.export", "export vision_encoder/ + processors from a pretraining checkpoint"),
    "reconstruct": ("arlow.pretrain.reconstruct", "MAE reconstruction grid (PNG) for images or videos"),
    "create-model": ("arlow.assemble", "write a model folder: a preset with random weights, or encoder + text model"),
    "probe": ("arlow.evaluation.probe", "k-NN and linear-probe accuracy of a vision encoder's frozen features"),
    "align": ("arlow.finetune.align", "stage 2: train the mergers on image/video-caption pairs (loss on captions)"),
    "sft": ("arlow.finetune.sft", "stage 3: instruction tuning on conversations (full, LoRA or QLoRA)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arlow", description="Arlow vision-language models: train, export, evaluate.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as err:  # a command whose module is not installed in this build
            p.set_defaults(_missing=str(err))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", None):
        parser.error(f"command {args.command!r} is unavailable: {args._missing}")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError, KeyboardInterrupt) as err:  # bad configs and inputs, Ctrl-C: one line
        if args.debug:
            raise
        interrupted = isinstance(err, KeyboardInterrupt)
        print(f"arlow {args.command}: {'' if interrupted else 'error: '}{err or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return 130 if interrupted else 2
    except RuntimeError as err:
        stopped = getattr(sys.modules.get("arlow.training.engine"), "TrainingStopped", ())
        if args.debug or not isinstance(err, stopped):
            raise
        print(f"arlow {args.command}: {err}", file=sys.stderr)  # NaN/inf losses, a data error on another process
        return 1


if __name__ == "__main__":
    sys.exit(main())
