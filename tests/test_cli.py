"""``arlow --help``, ``arlow <command> --help`` and usage errors are answered without importing torch, transformers or
any ``arlow`` module (they took 5 s of CPU, 15-57 s on a busy machine, when building the parser imported every
command); a command's module is imported only when it runs."""

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = """
import json, sys
from arlow_cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "arlow", "numpy"))
print(json.dumps({"code": code, "heavy": heavy}))
"""


def run_cli(*argv):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout, done.stderr


@pytest.mark.parametrize("argv, code, says", [
    ([], 0, "COMMAND"),
    (["--help"], 0, "create-model"),
    (["pretrain", "--help"], 0, "tiny_demo"),
    (["sft", "--help"], 0, "sft_tiny"),
    (["probe", "--help"], 0, "--random-init"),
    (["nosuch"], 2, "invalid choice: 'nosuch'"),
    (["probe", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["reconstruct"], 2, "the following arguments are required: --checkpoint, --inputs"),
    (["probe", "--k", "many"], 2, "invalid int value: 'many'"),
])
def test_help_and_usage_errors_import_nothing_heavy(argv, code, says):
    result, out, err = run_cli(*argv)
    assert result["code"] == code
    assert says in out + err
    assert result["heavy"] == [], f"parsing imported {result['heavy']}"


def test_every_command_module_runs_its_parsed_arguments():
    from arlow_cli import COMMANDS, build_parser

    parser = build_parser()
    for name, (module, _, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).run), name
    args = parser.parse_args(["probe", "enc", "--epochs", "3"])
    assert (args._module, args.encoder, args.epochs, args.lr) == ("arlow.evaluation.probe", "enc", 3, None)


WAIT_POLICY_PROBE = """
import json, os, sys
from arlow_cli import main
main(["pretrain", "--print-config"])
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_commands_run_with_a_sleeping_openmp_pool_unless_the_user_chose(given, expected):
    """A spinning OpenMP pool made ``arlow pretrain`` ~8x slower on a busy 2-core host (docs/training.md): the
    command sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads, and keeps a value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", WAIT_POLICY_PROBE], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"policy": expected}


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_releases_its_process_groups_only_after_a_clean_finish(tmp_path, monkeypatch, fails):
    """A process leaving with a gloo group alive can abort in interpreter teardown; after an error the group stays
    (destroying it while another process waits in a collective would hang)."""
    import torch.distributed as dist

    import arlow_cli

    def run(args):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        if fails:
            raise ValueError("bad recipe")
        return 0

    monkeypatch.setattr(arlow_cli.importlib, "import_module", lambda name: types.SimpleNamespace(run=run))
    try:
        assert arlow_cli.main(["pretrain"]) == (2 if fails else 0)
        assert dist.is_initialized() == fails
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
