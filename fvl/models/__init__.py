"""Models: ``build_model(cfg.model)`` composes vision tower -> fusion -> projector -> LLM from a config.

Public API (stable): ``build_model``, ``FlorenceVL`` (``.vision.features(pixel_values)``,
``.encode_images(pixel_values)``, ``forward(batch)``, ``generate(images, prompts)``), ``set_trainable``,
``save_checkpoint`` / ``load_checkpoint``, ``export`` / ``load_exported``.
"""

from __future__ import annotations

from typing import Any

from fvl.models.checkpoint import export, load_checkpoint, load_exported, model_config, save_checkpoint
from fvl.models.config import ModelConfig
from fvl.models.florence_vl import FlorenceVL, ImageTokenMismatch
from fvl.models.freeze import STAGE_TRAINABLE, set_trainable


def build_model(cfg: Any) -> FlorenceVL:
    """Build the composed model from ``cfg.model`` of an experiment (a DictConfig, dict or ModelConfig)."""
    return FlorenceVL(model_config(cfg))


__all__ = [
    "FlorenceVL",
    "ImageTokenMismatch",
    "ModelConfig",
    "STAGE_TRAINABLE",
    "build_model",
    "export",
    "load_checkpoint",
    "load_exported",
    "save_checkpoint",
    "set_trainable",
]
