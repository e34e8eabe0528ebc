"""A vision tower's image transform: encoded bytes or a PIL image -> ``uint8 [3, size, size]``, and the
normalisation that turns those into the tower's float input.

The uint8 contract: the data side (``Processor``, DataLoader workers) makes ``uint8`` RGB tensors
``[3, size, size]``, a quarter of float32's bytes to pickle, pin and copy; the model normalises them on its
device with ``ImageTransform.normalize`` (``FlorenceVL.encode_images`` does), ``(x / 255 - mean) / std`` in
float32. Float tensors count as already normalised and pass through unchanged.

Geometry: ``square`` resizes to ``size x size`` (the aspect ratio is lost); ``pad`` resizes the longest side
to ``size`` and centres the result on a ``size x size`` canvas of the mean colour (LLaVA's SFT pads to
square with the mean and then resizes; padding the small image instead is the same picture, cheaper).

``decode`` decodes encoded bytes once, at the size needed: a JPEG is decoded by libjpeg's DCT scaling
(``Image.draft``) at the smallest 1/2, 1/4 or 1/8 scale still at least as large as the resize target, so a
2250x1500 photo for a 768 px ``pad`` transform is decoded at 1125x750, never at full size. Bad bytes raise
``ImageError`` with a ``reason``: ``unreadable_image``, ``empty_image`` or ``decompression_bomb``.

Each tower states its transform (``VisionTower.transform_for(cfg, mode)``) without being built, so the data
side can prepare batches for a model it never instantiates."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

from fvl.config.stage import RESIZE_MODES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_ERROR_REASONS = ("unreadable_image", "empty_image", "decompression_bomb")
# PIL's own default bomb threshold (Image.MAX_IMAGE_PIXELS), fixed here so that no global setting changes it.
MAX_IMAGE_PIXELS = 89_478_485
# Shrinking by 2 x REDUCING_GAP or more per axis, resize in two steps (an integer box reduction, then bicubic),
# as Image.thumbnail does. Measured here: a 4000x3000 image to 768x576, 117 ms -> 47 ms, mean abs diff 0.23
# grey levels (max 2) from a one-step bicubic; 1.5 would also cover 3000x2000 (69 -> 33 ms, 0.29 levels).
# It matters for PNGs and other formats without DCT scaling: after a JPEG's draft the factor left is < 2.
REDUCING_GAP = 2.0


class ImageError(ValueError):
    """Image bytes that cannot become a training image; ``reason`` is one of ``IMAGE_ERROR_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in IMAGE_ERROR_REASONS:
            raise ValueError(f"image error reason {reason!r}: expected one of {IMAGE_ERROR_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA (onto white), CMYK and 16-bit images become 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # By the bit depth, never by the image's own maximum (a dark 16-bit image stays dark): 16-bit values
        # / 257 (65535 -> 255). 32-bit "I" has no depth of its own: values above 255 are taken as 16-bit.
        arr = np.asarray(image, dtype=np.float64)
        sixteen = image.mode != "I" or (arr.size and arr.max() > 255)
        arr = arr / 257.0 if sixteen else arr
        image = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Encoded bytes or a PIL image -> ``uint8 [3, size, size]`` for one tower, and ``normalize`` to its
    float input; picklable for DataLoader workers."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "square"

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.mode!r}: expected one of {RESIZE_MODES}")

    def with_mode(self, mode: str) -> ImageTransform:
        return ImageTransform(self.size, self.mean, self.std, mode)

    @property
    def fill(self) -> tuple[int, int, int]:
        """The padding colour: the mean, in 0..255."""
        return tuple(int(round(255 * m)) for m in self.mean)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size a ``width x height`` image is resized to before any padding."""
        if self.mode == "square":
            return self.size, self.size
        scale = self.size / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def decode(self, data: bytes, where: str = "") -> torch.Tensor:
        """Encoded image bytes -> ``uint8 [3, size, size]``, decoded once (a JPEG at a reduced DCT scale).
        Raises ``ImageError``; ``where`` (a file or sample name) goes into its message."""
        image = _open(data, where)
        target = self.resized_size(*image.size)
        if isinstance(image, JpegImagePlugin.JpegImageFile):  # JPEG, and MPO (phone photos): frame 0
            image.draft("RGB", target)  # a no-op unless 1/2, 1/4 or 1/8 scale still covers ``target``
            _strict_jpeg_reads(image)
        _load(image, where)
        return self._finish(image, target, where)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An open PIL image -> ``uint8 [3, size, size]`` (the same geometry as ``decode``). The image is
        not changed: no draft, so a caller that keeps it keeps it at full size."""
        if image.width == 0 or image.height == 0:
            raise ImageError("empty_image", f"{image.width}x{image.height}")
        if isinstance(image, JpegImagePlugin.JpegImageFile) and getattr(image, "fp", None) is not None:
            _strict_jpeg_reads(image)  # not yet loaded: truncated data must fail here too, flag or not
        _load(image)  # a lazily opened file's bad data raises ImageError here too
        return self._finish(image, self.resized_size(*image.size))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [..., 3, H, W]`` on any device -> float32 ``(x / 255 - mean) / std`` there; float input is
        taken as already normalised and returned as is. The caller casts to its compute dtype."""
        if pixels.is_floating_point():
            return pixels
        if pixels.dtype != torch.uint8:
            raise TypeError(f"pixels of dtype {pixels.dtype}: expected uint8 images or normalised floats")
        # Operation for operation what the float pipeline did on the CPU (divide, subtract, divide, all in
        # float32), so a uint8 batch normalised here equals the float tensors it used to make.
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return (pixels.to(torch.float32) / 255.0 - mean) / std

    def _finish(self, image: Image.Image, target: tuple[int, int], where: str = "") -> torch.Tensor:
        """RGB, resize to ``target`` (from whatever size the image was decoded at), pad, to a tensor."""
        try:
            image = to_rgb(image)
        except (OSError, ValueError) as e:  # a mode PIL cannot convert
            raise ImageError("unreadable_image", _at(where, f"mode {image.mode}: {e}")) from None
        if image.size != target:
            image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
        if image.size != (self.size, self.size):
            canvas = Image.new("RGB", (self.size, self.size), self.fill)
            canvas.paste(image, ((self.size - image.width) // 2, (self.size - image.height) // 2))
            image = canvas
        # Channel planes straight from PIL: contiguous CHW for the price of one copy (a permuted HWC view
        # would make collate's torch.stack do a strided copy, about 3x slower).
        return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


def _at(where: str, what: str) -> str:
    return f"{where}: {what}" if where else what


def _open(data: bytes, where: str) -> Image.Image:
    """Read the header only, and refuse empty bytes and bombs before any pixel is decoded."""
    if not data:
        raise ImageError("empty_image", _at(where, "0 bytes"))
    try:
        with warnings.catch_warnings():  # PIL warns above its (global) limit; ours is an error below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", _at(where, str(e))) from None
    except Exception as e:  # unknown format, corrupt header: PIL raises many types
        raise ImageError("unreadable_image", _at(where, f"{type(e).__name__}: {e}")) from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError("empty_image", _at(where, f"{width}x{height}"))
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError("decompression_bomb", _at(where, f"{width}x{height} > {MAX_IMAGE_PIXELS} pixels"))
    return image


def _strict_jpeg_reads(image: Image.Image) -> None:
    """Make running out of JPEG data an error whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says: with it
    set (by any library in the process), PIL fills a truncated JPEG's missing rows with grey and no error."""
    read = image.fp.read

    def strict_read(n: int) -> bytes:
        chunk = read(n)
        if not chunk and n:
            raise OSError("image file is truncated")
        return chunk

    image.load_read = strict_read  # PIL's per-image hook for reading compressed data (JpegImageFile's)


def _load(image: Image.Image, where: str = "") -> None:
    try:
        image.load()
    except Exception as e:  # truncated, corrupt data
        raise ImageError("unreadable_image", _at(where, f"{type(e).__name__}: {e}")) from None
