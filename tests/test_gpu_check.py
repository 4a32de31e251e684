"""The device check's Python part rehearses on the CPU (``--device cpu --quick``): the steps run and report.

On a GPU the same steps measure the figures (scripts/gpu_check.sh; docs/pretraining.md, "Device check"). Here each
step's verdict still rests on its own comparisons (checkpointed against plain gradients, the MAE step's losses
finite), so a step that breaks against the current API fails this test. The other steps (attention kernels,
generation, launchers, arlow pretrain, compile) take minutes on 2 cores: the slow test runs the cheaper of them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rehearse(tmp_path, *steps: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--work", str(tmp_path), *steps], capture_output=True, text=True, env=env, timeout=600)
    results = dict(re.findall(r"^\[gpu-check\] (\S+) +(PASS|FAIL|SKIP) - ", proc.stdout, flags=re.M))
    assert proc.returncode == (1 if "FAIL" in results.values() else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def test_quick_rehearsal_of_the_training_steps(tmp_path):
    results = _rehearse(tmp_path, "env", "mfu", "checkpointing")
    # the MFU target is a GPU target: on the CPU the figure is reported and the verdict skipped
    assert results == {"env": "PASS", "mae-step": "PASS", "mfu": "SKIP", "checkpointing": "PASS"}


@pytest.mark.slow
def test_quick_rehearsal_of_the_attention_and_generation_steps(tmp_path):
    """About a minute on 2 cores (the compiled flex kernel is built once)."""
    results = _rehearse(tmp_path, "attention", "generate")
    assert results == {"device-numerics": "PASS", "sdpa": "PASS", "arlow-flex": "PASS", "flex-lengths": "PASS",
                       "generate-text": "PASS", "generate-vlm": "PASS"}
