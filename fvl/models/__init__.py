"""Models: ``build_model(cfg.model)`` composes vision tower -> fusion -> projector -> LLM from a config.

Public API (stable): ``build_model``, ``FlorenceVL`` (``.vision.features(pixel_values)``,
``.encode_images(pixel_values)``, ``forward(batch)``, ``generate(images, prompts)``, ``.processor``),
``build_processor`` (the data side's tokenizer + template + image transform, without a model),
``set_trainable``, ``save_checkpoint`` / ``load_checkpoint``,
``load_for_inference`` (a file, a run folder or ``latest``).
"""

from __future__ import annotations

from typing import Any

from fvl.config.model import ModelConfig
from fvl.inputs.processor import Processor
from fvl.models.check import check
from fvl.models.checkpoint import load_checkpoint, model_config, save_checkpoint
from fvl.models.florence_vl import FlorenceVL, ImageTokenMismatch
from fvl.models.freeze import set_trainable
from fvl.models.loading import load_for_inference, load_model_weights
from fvl.models.processor import build_processor


def build_model(cfg: Any) -> FlorenceVL:
    """Build the composed model from ``cfg.model`` of an experiment (a ``ModelConfig``, a dict or YAML), after
    checking the names and token budget it states (``fvl.models.check``)."""
    cfg = model_config(cfg)
    check(cfg)
    return FlorenceVL(cfg)


__all__ = [
    "FlorenceVL",
    "ImageTokenMismatch",
    "ModelConfig",
    "Processor",
    "build_model",
    "check",
    "build_processor",
    "load_checkpoint",
    "load_for_inference",
    "load_model_weights",
    "save_checkpoint",
    "set_trainable",
]
