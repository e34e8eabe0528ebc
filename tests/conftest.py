"""Session set-up (an offline, private cache; two threads) and the shared fixtures. Helpers that tests
import live in ``tests/fixtures.py``."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Tiny tokenizers are built on first use into this session's own cache, so the build path is exercised.
os.environ.setdefault("FVL_CACHE", tempfile.mkdtemp(prefix="fvl-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

from tests.fixtures import tiny_cfg  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny model shared by read-only tests (do not train it in place)."""
    from fvl.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()
