"""The paper's Fig. 3, as ``fvl pca``: PCA of each named vision feature of one image, the first three
components shown as RGB, one panel per feature, background (low first component) blacked out."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fvl.models.vision.towers import split_name


def feature_pca(feature: torch.Tensor, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``[N, D]`` tokens of a square grid -> (``[h, w, 3]`` RGB in [0, 1], explained variance of the 3 PCs).

    The sign of the first component is chosen so that the border tokens (most likely background) score
    low; tokens whose min-max-normalised first component is below ``threshold`` are black."""
    x = feature.float()
    x = x - x.mean(0, keepdim=True)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    k = min(3, v.shape[0])
    comps = x @ v[:k].T  # [N, k]
    if k < 3:
        comps = torch.cat([comps, comps.new_zeros(len(comps), 3 - k)], dim=1)
    side = int(round(math.sqrt(len(x))))
    if side * side != len(x):
        raise ValueError(f"{len(x)} tokens do not form a square grid")
    grid = comps.reshape(side, side, 3)
    border = torch.cat([grid[0, :, 0], grid[-1, :, 0], grid[:, 0, 0], grid[:, -1, 0]])
    if border.mean() > grid[..., 0].mean():
        grid[..., 0] = -grid[..., 0]
    lo, hi = grid.amin(dim=(0, 1)), grid.amax(dim=(0, 1))
    rgb = (grid - lo) / (hi - lo).clamp_min(1e-8)
    rgb[rgb[..., 0] < threshold] = 0.0
    var = (s**2) / (s**2).sum().clamp_min(1e-12)
    explained = np.zeros(3)
    explained[:k] = var[:k].numpy()
    return rgb.numpy(), explained


@torch.no_grad()
def pca_panels(
    model, image: Image.Image, names: list[str] | None = None, threshold: float = 0.5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first three principal components of each feature of ``names`` (default: every tower's), each on
    its own tower's grid (no alignment: SigLIP's 27 x 27 stays 27 x 27), as RGB."""
    pixels = model.processor.transform.with_mode("square")(image)[None]  # uint8: each tower's input from it
    names = list(names or model.feature_names)
    panels = {}
    for name, feature in model.tower_features(pixels, names, aligned=False).items():
        tower = model.all_towers()[split_name(model.cfg.vision, name)[0]]
        start = (
            1 if getattr(tower, "keep_pooled_token", False) else 0
        )  # a kept pooled token is not on the grid
        panels[name] = feature_pca(feature[0, start:].float(), threshold)
    return panels


def write_pca(
    image: Image.Image, panels: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: str | Path
) -> tuple[Path, Path]:
    """``pca.png`` (the image, then one panel per feature) and ``pca.csv`` (explained variance per PC)."""
    from fvl.util.extras import pyplot

    plt = pyplot()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.8))
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, (name, (rgb, _)) in zip(axes[1:], panels.items(), strict=True):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    png = out / "pca.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    csv_path = out / "pca.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["feature", "pc1", "pc2", "pc3"])
        for name, (_, var) in panels.items():
            w.writerow([name, *(f"{x:.6f}" for x in var)])
    return png, csv_path
