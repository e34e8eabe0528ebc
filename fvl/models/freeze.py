"""One place sets what trains, keeps it in float32, and logs it.

A stage declares its trainable components (``stage.trainable`` in ``experiments/stages/*.yaml``): stage 1
trains everything, Florence-2 included (the paper's recipe; the original code wrapped the tower in
``no_grad`` and so never trained it), stage 2 the fusion, projector and LLM. Parameters that cannot influence
the output (e.g. CLIP layers after the selected one, the Florence-2 encoder when no prompt feature is fused)
are frozen whatever the stage says and reported as ``unused``.

Precision: a parameter that trains is stored in float32 (the optimizer's master weights; bf16 enters only
through autocast, ``trainer.precision=bf16-mixed``). A frozen one is stored in its component's
``frozen_dtype`` (``model.vision.frozen_dtype``, ``model.llm.frozen_dtype``; float32 for fusion and projector).
Updating bf16 weights directly loses most small updates (a bf16 weight of 0.02 moves only by steps of
~1e-4), which is why the optimizer must never see them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fvl.config.model import COMPONENTS
from fvl.models.florence_vl import FlorenceVL
from fvl.models.vision.base import DTYPES

log = logging.getLogger(__name__)


def set_trainable(
    model: FlorenceVL, trainable: Sequence[str], llm_adapters_only: bool = False, label: str = ""
) -> dict[str, dict[str, int]]:
    """Let the ``trainable`` components train, freeze the rest, and return (and log) per-component
    parameter counts ``{component: {"trainable": n, "frozen": n, "unused": n}}``. With ``llm_adapters_only``
    (LoRA), only the LLM's adapter parameters (``lora_*``) train; its base weights stay frozen. ``label``
    (the stage's name) only titles the log."""
    towers = model.all_towers()
    known = [*COMPONENTS, *(f"vision.{t}" for t in model.cfg.vision.all_towers())]
    unknown = [c for c in trainable if c not in known]
    if unknown:
        raise ValueError(f"unknown components {unknown}; known: {', '.join(known)}")
    tower_cfgs = model.cfg.vision.all_towers()
    # (label, module, key prefix, whether it trains, frozen dtype): each tower is a part of ``vision``
    parts = [
        (f"vision.{t}" if len(towers) > 1 else "vision", tower, model.tower_prefix(t),
         "vision" in trainable or f"vision.{t}" in trainable, DTYPES[tower_cfgs[t].frozen_dtype])
        for t, tower in towers.items()
    ]  # fmt: skip
    parts += [
        (c, getattr(model, c), f"{c}.", c in trainable, DTYPES[model.cfg.llm.frozen_dtype] if c == "llm" else torch.float32)
        for c in COMPONENTS[1:]
    ]  # fmt: skip
    unused = _unused(model)
    counts: dict[str, dict[str, int]] = {}
    for label, module, prefix, trains, frozen_dtype in parts:
        c = {"trainable": 0, "frozen": 0, "unused": 0}
        for name, param in module.named_parameters():
            full = f"{prefix}{name}"
            train = trains and full not in unused
            if label == "llm" and llm_adapters_only:
                train = train and "lora_" in name
            param.requires_grad_(train)
            if param.is_floating_point():  # 4-bit (NF4) weights are integers: left as they are
                param.data = param.data.to(torch.float32 if train else frozen_dtype)
            key = "unused" if full in unused else "trainable" if train else "frozen"
            c[key] += param.numel()
        counts[label] = c
    if len(towers) > 1:  # the towers' sum under ``vision`` too: the key every run logs
        counts["vision"] = {
            k: sum(counts[f"vision.{t}"][k] for t in towers) for k in ("trainable", "frozen", "unused")
        }
    model.train(model.training)  # re-apply eval mode to components that no longer train
    lines = [f"trainable parameters{f' for stage {label!r}' if label else ''}:"]
    for component, c in counts.items():
        lines.append(
            f"  {component:<16} trainable {c['trainable']:>14,}  frozen {c['frozen']:>14,}  unused {c['unused']:>12,}"
        )
    log.info("\n".join(lines))
    return counts


def _unused(model: FlorenceVL) -> set[str]:
    """Full names of the tower parameters no fused feature depends on."""
    from fvl.models.vision.towers import by_tower

    towers, unused = model.all_towers(), set()
    wanted = by_tower(model.cfg.vision, model.fusion.names)
    for key, tower in towers.items():
        own = [name for _, name in wanted.get(key, [])]
        prefix = model.tower_prefix(key)
        if own:
            unused |= {f"{prefix}{n}" for n in tower.unused_parameters(own)}
        else:  # a tower whose features are all left out of the fusion: nothing of it counts
            unused |= {f"{prefix}{n}" for n, _ in tower.named_parameters()}
    return unused
