"""transformers' own common test suites, loaded for the conformance tests (``tests/test_conformance_*.py``).

Where the suites come from, first found wins:
1. ``ARLOW_TRANSFORMERS_TESTS``: the ``tests/`` folder of a transformers source tree of the installed version (a git
   checkout has every suite, including ``tests/generation/test_utils.py``);
2. ``.cache/transformers-tests/<transformers.__version__>/tests``, filled by ``scripts/fetch_transformers_tests.py``
   (``.ci/run`` calls it) from the version's source distribution.
Absent both, every conformance test is skipped with the command that fetches them.

The folder is imported as the package ``transformers_tests`` (the project's own folder is also named ``tests``).
The source distribution ships the common files but not four helpers they import; for those, import-only stand-ins
are installed and the checks that need them are skipped with that reason (``MISSING``):
``generation/test_utils.py`` (``GenerationTesterMixin``: the generation contract is then covered by the project's
own tests in ``test_conformance_generation.py``), ``exporters/test_export.py`` (``torch.export`` checks),
``utils/test_configuration_utils.py`` (``config_common_kwargs``) and ``utils/fetch_hub_objects_for_ci.py`` (maps
Hub media URLs to a local cache; its stand-in maps image URLs to local random images, while tests that read the Hub's
videos or audio need the network).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import transformers

PACKAGE = "transformers_tests"
ROOT = Path(__file__).resolve().parents[1]
FETCH = "python scripts/fetch_transformers_tests.py"

# Helper modules the suites import -> the attributes an import-only stand-in provides.
_HELPERS = {
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}
MISSING: set[str] = set()  # helpers replaced by a stand-in in this run


def tests_dir() -> Path | None:
    """The upstream ``tests/`` folder for the installed transformers, or ``None``."""
    given = os.environ.get("ARLOW_TRANSFORMERS_TESTS")
    candidates = [Path(given)] if given else []
    candidates.append(ROOT / ".cache" / "transformers-tests" / transformers.__version__ / "tests")
    for path in candidates:
        if (path / "test_modeling_common.py").is_file():
            return path
    return None


def _package(name: str, path: Path | None) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__path__ = [str(path)] if path is not None else []
        sys.modules[name] = module
    return module


def _install(folder: Path) -> None:
    if PACKAGE in sys.modules:
        return
    _package(PACKAGE, folder)
    for helper, names in _HELPERS.items():
        sub, leaf = helper.split(".")
        _package(f"{PACKAGE}.{sub}", folder / sub if (folder / sub).is_dir() else None)
        if (folder / sub / f"{leaf}.py").is_file():
            continue
        stand_in = types.ModuleType(f"{PACKAGE}.{helper}")
        stand_in.__dict__.update(names)
        sys.modules[stand_in.__name__] = stand_in
        MISSING.add(helper)
    # test_processing_common / test_image_processing_common import this top-level module of the repository's utils/.
    utils = folder.parent / "utils"
    if (utils / "fetch_hub_objects_for_ci.py").is_file():
        sys.path.insert(0, str(utils))
    elif "fetch_hub_objects_for_ci" not in sys.modules:
        fetch = types.ModuleType("fetch_hub_objects_for_ci")
        fetch.url_to_local_path = _local_stand_in
        sys.modules[fetch.__name__] = fetch
        MISSING.add("utils.fetch_hub_objects_for_ci")


def _local_stand_in(url: str, *args, **kwargs) -> str:
    """For the missing ``url_to_local_path``: a Hub image URL -> a local random RGB image of the same name (the
    suites check shapes and token counts, not picture content); any other URL (videos, audio, whose tests expect
    the real clips' frame counts) is returned unchanged, and a test that reads it needs the network."""
    name = str(url).rsplit("/", 1)[-1]
    if not name.lower().endswith((".png", ".jpg", ".jpeg")):
        return url
    import tempfile

    import numpy as np
    from PIL import Image

    path = Path(tempfile.gettempdir()) / "arlow-transformers-tests-media" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(len(name)).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return str(path)


def load(name: str) -> types.ModuleType:
    """Import ``transformers_tests.<name>`` (e.g. ``"test_modeling_common"``) or skip the calling test module."""
    folder = tests_dir()
    if folder is None:
        pytest.skip(f"transformers' common test suites for transformers {transformers.__version__} are not here: "
                    f"run `{FETCH}` (needs the package index once) or set ARLOW_TRANSFORMERS_TESTS",
                    allow_module_level=True)
    _install(folder)
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as err:
        if err.name != "parameterized":
            raise
        pytest.skip("transformers' test suites need the `parameterized` package: pip install -e '.[dev]'",
                    allow_module_level=True)


def needs(helper: str) -> str | None:
    """Skip reason when ``helper`` (a key of ``_HELPERS``) is only a stand-in in this run, else ``None``."""
    if helper in MISSING:
        return (f"needs transformers' tests/{helper.replace('.', '/')}.py, which the source distribution does not "
                "ship; set ARLOW_TRANSFORMERS_TESTS to a transformers checkout's tests/ to run it")
    return None
