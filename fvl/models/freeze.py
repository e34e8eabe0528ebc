"""One place decides what trains in each stage, and logs it.

- ``pretrain``: everything - Florence-2 included (the paper's recipe; the original code wrapped the tower in
  ``no_grad`` and so never trained it);
- ``finetune``: projector + LLM (the vision tower frozen);
- ``align``: the projector alone (LLaVA-style projector warm-up and the alignment analysis).
Parameters that cannot influence the output (e.g. CLIP layers after the selected one, the Florence-2
encoder when no prompt feature is fused) are frozen in every stage and reported as ``unused``.
"""

from __future__ import annotations

import logging

from fvl.models.florence_vl import COMPONENTS, FlorenceVL

log = logging.getLogger(__name__)

STAGE_TRAINABLE: dict[str, tuple[str, ...]] = {
    "pretrain": ("vision", "fusion", "projector", "llm"),
    "finetune": ("fusion", "projector", "llm"),
    "align": ("fusion", "projector"),
}


def set_trainable(
    model: FlorenceVL, stage: str, llm_adapters_only: bool = False
) -> dict[str, dict[str, int]]:
    """Set ``requires_grad`` for ``stage`` and return (and log) per-component parameter counts:
    ``{component: {"trainable": n, "frozen": n, "unused": n}}``. With ``llm_adapters_only`` (LoRA), only the
    LLM's adapter parameters (``lora_*``) train; its base weights stay frozen."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_TRAINABLE)}")
    trainable = STAGE_TRAINABLE[stage]
    unused = {f"vision.{n}" for n in model.vision.unused_parameters(model.fusion.names)}
    counts: dict[str, dict[str, int]] = {}
    for component in COMPONENTS:
        c = {"trainable": 0, "frozen": 0, "unused": 0}
        for name, param in getattr(model, component).named_parameters():
            full = f"{component}.{name}"
            train = component in trainable and full not in unused
            if component == "llm" and llm_adapters_only:
                train = train and "lora_" in name
            param.requires_grad_(train)
            key = "unused" if full in unused else "trainable" if train else "frozen"
            c[key] += param.numel()
        counts[component] = c
    model.train(model.training)  # re-apply eval mode to components that no longer train
    lines = [f"trainable parameters for stage {stage!r}:"]
    for component, c in counts.items():
        lines.append(
            f"  {component:<10} trainable {c['trainable']:>14,}  frozen {c['frozen']:>14,}  unused {c['unused']:>12,}"
        )
    log.info("\n".join(lines))
    return counts
