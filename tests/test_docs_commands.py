"""The launch commands of docs/pretraining.md and docs/training.md are true for the current CLI and recipes.

Every shell block of those pages is read at test time. Each ``arlow ...`` command (also behind ``torchrun`` or
``accelerate launch ... -m arlow.cli``) must parse with the CLI's own parser; a ``pretrain`` command must load its
recipe with its overrides (every key checked) and derive its gradient accumulation for the number of processes its
launcher starts (``data.tokens_per_step`` must divide into whole rounds), and an FSDP launch must not also ask for
DeepSpeed. Launcher config files must exist; ``scripts/gpu_check.sh`` / ``.py`` lines must name existing steps.
Nothing trains: the recipe tree and the ``TrainConfig`` are built, which is where a wrong key or size fails.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from arlow.pretrain.run import load_recipe, resolve_accumulation
from arlow.training import TrainConfig
from arlow_cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("docs/pretraining.md", "docs/training.md")


def _commands(page: str) -> list[str]:
    """Shell commands of a page's ```bash blocks: comments dropped, continuation lines joined."""
    text = (ROOT / page).read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _option(tokens: list[str], name: str, default=None):
    return tokens[tokens.index(name) + 1] if name in tokens else default


def _launch(tokens: list[str]) -> tuple[int, list[str], Path | None]:
    """(processes, the arlow arguments, the accelerate config file or None) of one command line."""
    if tokens[0] == "arlow":
        return 1, tokens[1:], None
    cli = tokens.index("arlow.cli")
    launcher, args = tokens[:cli], tokens[cli + 1:]
    if launcher[0] == "torchrun":
        return int(_option(launcher, "--nproc_per_node", 1)) * int(_option(launcher, "--nnodes", 1)), args, None
    assert launcher[:2] == ["accelerate", "launch"], launcher
    config = _option(launcher, "--config_file")
    config = ROOT / config if config else None
    if config is not None:
        assert config.is_file(), f"launcher config {config} does not exist"
    processes = _option(launcher, "--num_processes")
    if processes is None:
        processes = yaml.safe_load(config.read_text())["num_processes"] if config else 1
    return int(processes), args, config


def _arlow_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for line in _commands(page):
            tokens = shlex.split(line)
            while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):  # VAR=value prefixes
                tokens = tokens[1:]
            if tokens and (tokens[0] == "arlow" or "arlow.cli" in tokens):
                found.append((page, line))
    return found


COMMANDS = _arlow_commands()


def test_the_pages_show_the_launches_they_describe():
    lines = [line for _, line in COMMANDS]
    assert len(lines) >= 15
    assert any("--nnodes 4" in line for line in lines) and any("--num_machines 4" in line for line in lines)
    assert any("fsdp.yaml" in line for line in lines)


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p.split('/')[1]}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_command_parses_and_its_recipe_loads(page, line):
    tokens = [t for t in shlex.split(line) if t != "..."]
    while "=" in tokens[0] and not tokens[0].startswith("-"):
        tokens = tokens[1:]
    processes, args, config = _launch(tokens)
    parsed = build_parser().parse_args(args)
    if parsed.command != "pretrain":
        return
    overrides = list(parsed.overrides) + ([f"train.resume={parsed.resume}"] if parsed.resume else [])
    tree = load_recipe(parsed.config, overrides)
    train = TrainConfig.from_dict(resolve_accumulation(tree, processes))
    tokens_per_step = (tree.get("data") or {}).get("tokens_per_step")
    if tokens_per_step:
        rows = int(tree["data"].get("tokens_per_batch", 4096))
        assert train.gradient_accumulation_steps * rows * processes == tokens_per_step
    if config is not None and yaml.safe_load(config.read_text()).get("distributed_type") == "FSDP":
        assert train.deepspeed_config is None, f"{page}: an FSDP launch that also names DeepSpeed: {line}"


def test_device_check_commands_name_existing_steps():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    lines = [line for line in _commands("docs/pretraining.md") if "gpu_check." in line]
    assert len(lines) >= 3
    for line in lines:
        tokens = shlex.split(line)
        script = next(t for t in tokens if "gpu_check." in t)
        assert (ROOT / script).is_file()
        steps = [t for t in tokens[tokens.index(script) + 1:] if not t.startswith("-") and t not in ("cpu",)]
        assert all(step in gpu_check.STEPS for step in steps), (line, gpu_check.STEPS)
