"""Vision towers, chosen by ``model.vision.name`` (and ``model.vision.towers.<key>.name`` for more beside it,
``fvl.models.vision.towers``). Add one: a file with a ``VisionTower`` subclass and one
``VISION_TOWERS.register`` line here."""

import dataclasses

from fvl.config.model import TowerConfig, VisionConfig
from fvl.inputs.transform import ImageTransform
from fvl.models.vision.base import VisionTower
from fvl.models.vision.florence2 import Florence2Tower
from fvl.models.vision.hf_vit import CLIPTower, SiglipTower
from fvl.util.registry import Registry

VISION_TOWERS: Registry[VisionTower] = Registry("vision tower")
VISION_TOWERS.register("florence2")(Florence2Tower)
VISION_TOWERS.register("clip")(CLIPTower)
VISION_TOWERS.register("siglip")(SiglipTower)


def build_vision_tower(cfg: TowerConfig, resize_mode: str = "pad") -> tuple[VisionTower, ImageTransform]:
    """``(tower, transform)``: the tower and the preprocessing its pixels need; with ``cfg.compile`` its
    feature computation is compiled (lazily: traced at the first ``features`` call)."""
    tower = VISION_TOWERS.build(cfg.name, cfg)
    if cfg.compile:
        tower.compile()
    return tower, tower.transform(resize_mode)


def decode_transform(cfg: VisionConfig, features: list[str], resize_mode: str = "pad") -> ImageTransform:
    """What the data side makes of an image for a fusion of ``features``: the main tower's transform at the
    largest size of the towers in use (one decode serves every tower; ``fvl.models.vision.towers``). Read
    from the config alone."""
    transform = VISION_TOWERS.get(cfg.name).transform_for(cfg, resize_mode)
    return dataclasses.replace(transform, size=cfg.decode_size(list(features)))


__all__ = [
    "decode_transform",
    "VISION_TOWERS",
    "VisionTower",
    "build_vision_tower",
    "Florence2Tower",
    "CLIPTower",
    "SiglipTower",
]
