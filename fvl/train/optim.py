"""Optimizer and schedule: AdamW (torch or bitsandbytes 8-bit) over parameter groups, cosine with warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from fvl.config.train import TrainConfig


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters in up to four groups: vision / rest x decay / no decay (biases, norms and
    other 1-D tensors never decay). The vision towers (``vision.*`` and ``towers.*``) get ``vision_lr``
    (default ``lr``)."""
    vision_lr = cfg.lr if cfg.vision_lr is None else cfg.vision_lr
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "vision" if name.startswith(("vision.", "towers.")) else "main"
        groups.setdefault((part, p.ndim >= 2), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": vision_lr if part == "vision" else cfg.lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        })  # fmt: skip
    if not out:
        raise ValueError("no trainable parameters: check the stage and train.lora")
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
        fused=cfg.optimizer == "adamw_fused" or None,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of ``max_steps`` (at least one step), cosine decay to 0."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * max_steps)) if cfg.warmup_ratio > 0 else 0
    return get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
