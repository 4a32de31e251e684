import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def tiny_config():
    """``tiny_config(kind, **overrides)``: a tiny "vision", "text", "vlm" or "mae" config (tests/tiny.py)."""
    from tiny import tiny_config as make

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
