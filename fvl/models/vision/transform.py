"""A vision tower's image transform: RGB, square resize or pad to square with the mean colour (as LLaVA's
SFT does), resize to the tower's resolution, normalise with its mean and std.

Each tower states its transform (``VisionTower.transform_for(cfg, mode)``) without being built, so the data
side can prepare batches for a model it never instantiates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("square", "pad")


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA (onto white), CMYK and 16-bit images become 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 255 else 255.0
        image = Image.fromarray((arr * (255.0 / max(peak, 1.0))).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_image(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    mode: str = "square",
) -> torch.Tensor:
    """One image -> ``[3, size, size]`` float tensor."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {RESIZE_MODES}")
    image = to_rgb(image)
    if mode == "pad":
        image = pad_to_square(image, tuple(int(round(255 * m)) for m in mean))
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> ``[3, size, size]`` float tensor for one tower; picklable for DataLoader workers."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "square"

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.mode!r}: expected one of {RESIZE_MODES}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self.size, self.mean, self.std, self.mode)

    def with_mode(self, mode: str) -> ImageTransform:
        return ImageTransform(self.size, self.mean, self.std, mode)
