"""Fetch transformers' common test suites (its source distribution's ``tests/``) for the installed version.

    python scripts/fetch_transformers_tests.py        # -> .cache/transformers-tests/<version>/tests

The conformance tests (``tests/test_conformance_*.py``) run transformers' own ``ModelTesterMixin``, ``ConfigTester``,
``ImageProcessingTestMixin`` and ``ProcessorTesterMixin`` against the Arlow classes; they skip when this folder is
absent. The sdist comes from the package index through pip (the version is ``transformers.__version__``, so a
second environment on another transformers version gets its own folder). Idempotent: an existing folder is kept.
"""

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "transformers-tests"


def _download_sdist(version: str, folder: str) -> None:
    """``pip download`` the sdist. pip reads its metadata, which needs a setuptools that can build wheels: first the
    one installed (no download); a venv's own bundled setuptools (65.x, without ``wheel``) cannot, so then pip's
    isolated build environment, which takes setuptools from the package index."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "transformers",
               f"transformers=={version}", "-d", folder]
    if subprocess.run(command + ["--no-build-isolation"], capture_output=True).returncode != 0:
        subprocess.run(command, check=True)


def fetch(version: str = transformers.__version__, cache: Path = CACHE) -> Path:
    """Download ``transformers==version``'s sdist and unpack its ``tests/`` into ``cache/<version>/tests``."""
    target = cache / version / "tests"
    if (target / "test_modeling_common.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _download_sdist(version, tmp)
        sdist = next(Path(tmp).glob("transformers-*.tar.gz"))
        prefix = f"{sdist.name[:-len('.tar.gz')]}/tests/"
        staging = Path(tempfile.mkdtemp(dir=cache.mkdir(parents=True, exist_ok=True) or cache))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        (staging / "__init__.py").touch()  # the repository's tests/ is a package; the sdist leaves the file out
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)  # complete or absent, never half-written
    return target


if __name__ == "__main__":
    print(fetch())
