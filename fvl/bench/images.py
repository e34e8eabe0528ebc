"""Image decode + preprocess cost per image, side by side in one run: ``bench_images()``.

Photo-like test files are written to a temporary folder (2250x1500 JPEGs at quality 90, 512x512 PNGs) and
each is read and made into a ``size x size`` image by:

- ``naive``: ``Image.open(f).convert("RGB").resize((size, size))``, the yardstick;
- ``pad`` and ``square``: ``ImageTransform.decode(bytes)`` in each resize mode (one decode, a JPEG at a
  reduced DCT scale, ``uint8`` out; normalisation happens later, on the model's device);
- ``before``: the loader's path before ``decode`` existed, reimplemented here: a full verify decode, a second
  full decode, pad to square at full size, bicubic resize, float32 normalisation.

Every method reads the file's bytes inside its timed loop. The methods take turns within each repeat, so
machine noise falls on all of them alike; the figures are medians over the repeats.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fvl.inputs.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, to_rgb

JPEG_SIZE = (2250, 1500)
PNG_SIZE = (512, 512)
JPEG_QUALITY = 90


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image with some grain: large colour blobs, finer detail, a lighting gradient and sensor
    noise, so that it compresses (and decodes) about as a photo does, unlike flat colour or white noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((4, 0.6), (24, 0.3), (120, 0.1)):  # octaves of smooth noise, coarse to fine
        grid = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), dtype=np.uint8)
        out += weight * np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
    out *= np.linspace(0.7, 1.1, width, dtype=np.float32)[None, :, None]  # light falling across the frame
    out += rng.normal(0.0, 3.0, out.shape).astype(np.float32)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _write_files(folder: Path, n: int) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {"jpeg": [], "png": []}
    for i in range(n):
        jpeg, png = folder / f"photo{i}.jpg", folder / f"photo{i}.png"
        photo_like(*JPEG_SIZE, seed=i).save(jpeg, quality=JPEG_QUALITY)
        photo_like(*PNG_SIZE, seed=n + i).save(png)
        files["jpeg"].append(jpeg)
        files["png"].append(png)
    return files


def _before(data: bytes, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """BEFORE: the old loader path, kept here only to measure against. A full decode to verify the bytes, a
    second full decode, pad the full-size image to square, resize it, normalise to float32."""
    Image.open(io.BytesIO(data)).load()
    image = to_rgb(Image.open(io.BytesIO(data)))
    w, h = image.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in mean))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _methods(size: int) -> dict[str, Callable[[Path], object]]:
    pad = ImageTransform(size, IMAGENET_MEAN, IMAGENET_STD, "pad")
    square = pad.with_mode("square")
    return {
        "naive": lambda f: Image.open(f).convert("RGB").resize((size, size)),
        "pad": lambda f: pad.decode(f.read_bytes()),
        "square": lambda f: square.decode(f.read_bytes()),
        "before": lambda f: _before(f.read_bytes(), size, IMAGENET_MEAN, IMAGENET_STD),
    }


def _ms_per_image(method: Callable[[Path], object], files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        method(f)
    return (time.perf_counter() - start) * 1000.0 / len(files)


def _compare(files: list[Path], size: int, repeats: int) -> dict[str, float]:
    """Median ms per image of each method and the median (over repeats) of its ratio to ``naive``."""
    methods = _methods(size)
    for method in methods.values():  # warm-up: file cache, allocator, lazy imports
        _ms_per_image(method, files[:2])
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            runs[name].append(_ms_per_image(method, files))
    figures = {f"{name}_ms": statistics.median(ms) for name, ms in runs.items()}
    for name in methods:
        if name != "naive":
            ratios = [m / b for m, b in zip(runs[name], runs["naive"], strict=True)]
            figures[f"{name}_vs_naive"] = statistics.median(ratios)
    return figures


def bench_images(n: int = 24, size: int = 768, repeats: int = 5) -> dict:
    """ms per image (medians over ``repeats``) and ratios to the naive decode + resize, for ``n`` 2250x1500
    JPEGs and ``n`` 512x512 PNGs at ``size`` px. Prints nothing; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="fvl-bench-images-") as tmp:
        files = _write_files(Path(tmp), n)
        return {
            "n": n,
            "size": size,
            "repeats": repeats,
            "jpeg_2250x1500": _compare(files["jpeg"], size, repeats),
            "png_512x512": _compare(files["png"], size, repeats),
        }


def lines(r: dict) -> list[str]:
    """The figures of ``bench_images``, a line per image kind."""
    return [
        f"images {kind} -> {r['size']} px, ms per image: naive {f['naive_ms']:.1f}, pad {f['pad_ms']:.1f} "
        f"({f['pad_vs_naive']:.2f}x), square {f['square_ms']:.1f} ({f['square_vs_naive']:.2f}x), "
        f"before {f['before_ms']:.1f} ({f['before_vs_naive']:.2f}x)"
        for kind, f in ((k, r[k]) for k in ("jpeg_2250x1500", "png_512x512"))
    ]
