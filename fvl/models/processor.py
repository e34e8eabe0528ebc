"""The processor: what turns conversations and images into model inputs, built from ``cfg.model`` alone.

It holds the LLM tokenizer (with the image placeholder), the chat template, the vision tower's image
transform (at the largest tower's size when there are several) and the number of LLM tokens per image. ``build_processor(cfg.model)`` makes one without building
the model (the tower class and the fusion class answer from the config), so the data side never needs the
model object; the model exposes the same thing as ``model.processor``, and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses

from fvl.config.model import ModelConfig
from fvl.inputs.processor import Processor
from fvl.models.fusion import FUSIONS
from fvl.models.llm import build_tokenizer
from fvl.models.vision import VISION_TOWERS, decode_transform
from fvl.text import get_template


def image_tokens_for(cfg: ModelConfig, strict: bool = True) -> int | None:
    """LLM tokens per image for ``cfg``, from the tower's and the fusion's classes (nothing is built).
    ``strict=False`` (config validation) answers from ``model.vision.arch`` when a pretrained tower's folder
    cannot be read yet, and None when nothing tells."""
    from fvl.assets.builtin import is_built, is_builtin

    tower = VISION_TOWERS.get(cfg.vision.name)
    try:
        if not strict and is_builtin(cfg.vision.path) and not is_built(cfg.vision.path):
            raise FileNotFoundError("not built yet: validating a config must not build a tower for minutes")
        per_feature = tower.tokens_for(cfg.vision)
    except (OSError, ValueError, TypeError):
        if strict:
            raise
        try:  # building the tower will report what is wrong; here only the count matters
            per_feature = tower.tokens_for(dataclasses.replace(cfg.vision, init="random", path=None))
        except (OSError, ValueError, TypeError):
            return None
    return FUSIONS.get(cfg.fusion.name).tokens_for(len(cfg.fusion.features), per_feature)


def build_processor(cfg: ModelConfig, resize_mode: str = "pad") -> Processor:
    """The processor of a model config, without building the model."""
    return Processor(
        build_tokenizer(cfg.llm, cfg.text),
        get_template(cfg.text.template),
        decode_transform(cfg.vision, cfg.fusion.features, resize_mode),
        image_tokens_for(cfg),
        cfg.text.max_length,
        cfg.text.min_text_tokens,
    )
