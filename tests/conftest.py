import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import tiny_config as _tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(kind, **overrides)``: a fresh tiny "vision", "encoder", "text", "vlm" or "mae" config
    (tests/tiny.py holds the sizes). Session-scoped so module-scoped fixtures can build from it; each call makes a
    new config, so overrides never leak between tests."""
    return _tiny_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
