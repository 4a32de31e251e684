"""``arlow prepare-data``'s entry point: reads the pretraining recipe (``--config`` + overrides) and hands its data
section to :func:`arlow.data.prepare.run`, which does the work.

The recipe loader lives here, in ``pretrain``, because it checks the data keys against :class:`PretrainData`;
``arlow.data`` sits below ``pretrain`` and must not import it (``tests/test_shards.py`` checks the direction).
"""

from __future__ import annotations

import argparse

from ..data import prepare
from .run import load_recipe

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Prepare the sources named by ``args`` or by the recipe's ``data`` section; returns the exit code."""
    return prepare.run(args, load_recipe(args.config, list(args.overrides)).get("data") or {})
