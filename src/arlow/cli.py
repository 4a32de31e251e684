"""``python -m arlow.cli <command>`` (as under ``torchrun`` or ``accelerate launch``): the ``arlow`` command line,
which lives in :mod:`arlow_cli` so that parsing never imports torch."""

from __future__ import annotations

import sys

from arlow_cli import COMMANDS, build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
