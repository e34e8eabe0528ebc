"""The checks of a model config against the code it names, before anything is built: registered names (tower,
fusion, projector, chat template) and the image-token budget (one image's tokens must leave
``model.text.min_text_tokens`` under ``model.text.max_length``). ``fvl.config.load`` cannot make them: the
config layer imports no model code. Training, ``fvl info`` and ``fvl eval`` run them right after loading."""

from __future__ import annotations

from fvl.config.model import ModelConfig
from fvl.models.fusion import FUSIONS
from fvl.models.processor import image_tokens_for
from fvl.models.projector import known_projector
from fvl.models.vision import VISION_TOWERS
from fvl.text.templates import TEMPLATES


def check(cfg: ModelConfig) -> None:
    """Raise ValueError naming the key whose value the code does not know or whose tokens do not fit."""
    for key, value, known in [
        ("model.vision.name", cfg.vision.name, VISION_TOWERS),
        ("model.fusion.name", cfg.fusion.name, FUSIONS),
        ("model.text.template (or stage.template)", cfg.text.template, TEMPLATES),
    ]:
        if value not in known:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(known)}")
    if not known_projector(cfg.projector.name):
        raise ValueError(
            f"model.projector.name={cfg.projector.name!r}: expected mlp{{N}}x_gelu or a registered projector"
        )
    tokens = image_tokens_for(cfg, strict=False)
    if tokens is not None and tokens + cfg.text.min_text_tokens > cfg.text.max_length:
        raise ValueError(
            f"model.text.max_length={cfg.text.max_length} leaves no room for text: one image is {tokens} "
            f"tokens (model.fusion.name={cfg.fusion.name} of {len(cfg.fusion.features)} features at "
            f"model.vision.image_size={cfg.vision.image_size}) and model.text.min_text_tokens="
            f"{cfg.text.min_text_tokens}; raise max_length or fuse fewer tokens"
        )
