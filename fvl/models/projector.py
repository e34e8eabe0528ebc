"""Projectors from fused vision features to the LLM's embedding width: ``mlp{N}x_gelu`` and ``linear``."""

from __future__ import annotations

import re

from torch import nn

from fvl.config.model import ProjectorConfig
from fvl.util.registry import Registry

PROJECTORS: Registry[nn.Module] = Registry("projector")


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp_gelu")
def mlp_gelu(in_dim: int, out_dim: int, hidden_dim: int | None = None, depth: int = 2) -> nn.Module:
    """``depth`` linear layers with GELU between and no norm: LLaVA's / the paper's ``mlp{depth}x_gelu``."""
    hidden = hidden_dim or out_dim
    widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


def known_projector(name: str) -> bool:
    match = re.fullmatch(r"mlp(\d+)x_gelu", name)
    return (match is not None and int(match.group(1)) >= 1) or (name in PROJECTORS and name != "mlp_gelu")


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    match = re.fullmatch(r"mlp(\d+)x_gelu", cfg.name)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"model.projector.name={cfg.name!r}: depth must be >= 1")
        return PROJECTORS.build("mlp_gelu", in_dim, out_dim, cfg.hidden_dim, depth=depth)
    return PROJECTORS.build(cfg.name, in_dim, out_dim, cfg.hidden_dim)
