"""Shared fixtures: tiny configs of every tower and LLM architecture, built offline in a private cache."""

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

from fvl.config import load  # noqa: E402

TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "patch_size": 8,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


def tiny_cfg(*overrides, **replace):
    """The tiny preset's model config with dot-list overrides (``fusion.name=avg_pool``); keyword
    arguments replace whole entries (``llm_arch=TINY_LLAMA`` sets ``model.llm.arch``), since a dict given
    as an override merges into the preset's instead of replacing it. ``build_model`` validates the result."""
    cfg = load("tiny", [f"model.{o}" for o in overrides]).model
    for key, value in replace.items():
        section, name = key.split("_", 1)
        cfg[section][name] = value
    return cfg


def tower_cfg(tower: str, *overrides: str):
    """The tiny preset with its tower swapped for a tiny CLIP or SigLIP (32 px, 16 tokens, layers -2 and -1)."""
    if tower == "florence2":
        return tiny_cfg(*overrides)
    return tiny_cfg(
        f"vision.name={tower}",
        "vision.image_size=32",
        "vision.layers=[-2,-1]",
        "fusion.features=[layer_-2,layer_-1]",
        *overrides,
        vision_arch=dict(TINY_VIT),
    )


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny model shared by read-only tests (do not train it in place)."""
    from fvl.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()
