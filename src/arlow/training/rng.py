"""Keep the training random streams out of reach of side work (checkpoint hooks, exports, previews).

Exact resume restores the RNG states saved with a checkpoint; anything that runs after they were saved and draws
from a global stream (building a model for an export, a reconstruction preview, a library that seeds) would make
the uninterrupted run diverge from the resumed one.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body, then put python ``random``, numpy's global RNG and torch's CPU and CUDA generators back to
    where they were, whatever the body drew or seeded (also when it raises)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
