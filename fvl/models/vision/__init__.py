"""Vision towers, chosen by ``model.vision.name``. Add one: a file with a ``VisionTower`` subclass and one
``VISION_TOWERS.register`` line here."""

from fvl.config.model import VisionConfig
from fvl.inputs.transform import ImageTransform
from fvl.models.vision.base import VisionTower
from fvl.models.vision.florence2 import Florence2Tower
from fvl.models.vision.hf_vit import CLIPTower, SiglipTower
from fvl.util.registry import Registry

VISION_TOWERS: Registry[VisionTower] = Registry("vision tower")
VISION_TOWERS.register("florence2")(Florence2Tower)
VISION_TOWERS.register("clip")(CLIPTower)
VISION_TOWERS.register("siglip")(SiglipTower)


def build_vision_tower(cfg: VisionConfig, resize_mode: str = "pad") -> tuple[VisionTower, ImageTransform]:
    """``(tower, transform)``: the tower and the preprocessing its pixels need; with ``cfg.compile`` its
    feature computation is compiled (lazily: traced at the first ``features`` call)."""
    tower = VISION_TOWERS.build(cfg.name, cfg)
    if cfg.compile:
        tower.compile()
    return tower, tower.transform(resize_mode)


__all__ = ["VISION_TOWERS", "VisionTower", "build_vision_tower", "Florence2Tower", "CLIPTower", "SiglipTower"]
