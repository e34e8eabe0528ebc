"""Several towers beside each other (``model.vision.towers``): which tower a feature name belongs to, each
tower's input made from one shared decode, and token grids brought to one.

Names: the main tower's features keep their plain names (``davit``, ``caption``) and may also be written
``<its name>.<feature>`` (``florence2.davit``); another tower's are ``<key>.<feature>`` (``siglip.layer_-2``),
``<key>`` its name under ``model.vision.towers``. ``canonical`` turns either form into the one fvl uses
(plain for the main tower, qualified for the others), so checkpoints and caches see one spelling.

Inputs: the data side decodes each image once, at the largest tower's size (``VisionConfig.decode_size``),
as ``uint8``. A tower at that size normalises it exactly as a single tower would; a smaller one resizes it on
the device first (bicubic with antialiasing, in float32 on 0..1 values) and normalises with its own mean and
std. Float pixels count as normalised with the main tower's statistics and are mapped back to 0..1 first.

Grids: a feature of ``N`` tokens is a square ``sqrt(N) x sqrt(N)`` grid in row-major order; one whose grid
differs from the main tower's is resampled to it before the fusion (``model.vision.grid_resampling``: area
averaging or bilinear interpolation), so DBFusion can concatenate channels token by token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fvl.config.model import VisionConfig
from fvl.inputs.transform import ImageTransform


def split_name(cfg: VisionConfig, name: str) -> tuple[str, str]:
    """``(tower name, the tower's own feature name)`` of a fusion feature name."""
    head, dot, rest = name.partition(".")
    if dot and (head in cfg.towers or head == cfg.name):
        return head, rest
    return cfg.name, name


def canonical(cfg: VisionConfig, name: str) -> str:
    """The one spelling of a feature name: plain for the main tower, ``<key>.<feature>`` for the others."""
    tower, feature = split_name(cfg, name)
    return feature if tower == cfg.name else f"{tower}.{feature}"


def by_tower(cfg: VisionConfig, names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``{tower name: [(canonical name, the tower's feature name)]}`` in the order the towers are listed."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        tower, feature = split_name(cfg, name)
        out.setdefault(tower, []).append((canonical(cfg, name), feature))
    return {t: out[t] for t in cfg.all_towers() if t in out}


def tower_input(pixels: torch.Tensor, main: ImageTransform, own: ImageTransform) -> torch.Tensor:
    """A tower's float32 input from the shared decode ``pixels`` (``uint8 [B, 3, S, S]``, or floats normalised
    with ``main``'s statistics): resized to ``own.size`` when it differs, normalised with ``own``'s."""
    if not pixels.is_floating_point() and pixels.shape[-1] == own.size:
        return own.normalize(pixels)  # the single-tower path, operation for operation
    if pixels.is_floating_point():
        if pixels.shape[-1] == own.size and (main.mean, main.std) == (own.mean, own.std):
            return pixels
        x = pixels.float() * _stat(main.std, pixels) + _stat(main.mean, pixels)
    else:
        x = pixels.to(torch.float32) / 255.0
    if x.shape[-1] != own.size:
        x = F.interpolate(x, size=(own.size, own.size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    return (x - _stat(own.mean, x)) / _stat(own.std, x)


def _stat(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(3, 1, 1)


def grid_side(tokens: int, what: str = "feature") -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(
            f"{what}: {tokens} tokens are no square grid; towers of different token counts can be fused only "
            "when both are square grids (keep_pooled_token adds one token: turn it off)"
        )
    return side


def align_grid(x: torch.Tensor, tokens: int, mode: str = "area") -> torch.Tensor:
    """``[B, N, D]`` on a square grid -> ``[B, tokens, D]`` on the ``sqrt(tokens)`` grid (``x`` itself when
    ``N == tokens``). ``area``: the mean over each target cell's area (``adaptive_avg_pool2d``); ``bilinear``:
    interpolation at the target cells' centres. Computed in float32, returned in ``x``'s dtype."""
    if x.shape[1] == tokens:
        return x
    b, n, d = x.shape
    side, target = grid_side(n), grid_side(tokens, "the main tower's grid")
    grid = x.transpose(1, 2).reshape(b, d, side, side).float()
    if mode == "area":
        out = F.adaptive_avg_pool2d(grid, target)
    elif mode == "bilinear":
        out = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"grid resampling {mode!r}: expected area or bilinear")
    return out.reshape(b, d, tokens).transpose(1, 2).to(x.dtype)
