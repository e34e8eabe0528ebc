"""Lightning strategies from a name in YAML. ``fsdp`` is given the model's own repeated blocks as wrap units
(``FlorenceVL.fsdp_wrap_classes``: each tower states its blocks, the LLM its ``_no_split_modules``), with
``use_orig_params`` so that frozen and trainable parameters can share a unit; every other name goes to
Lightning as it is (``ddp``, ``deepspeed_stage_2``, ``deepspeed_stage_3`` ...)."""

from __future__ import annotations

from typing import Any

from fvl.models import FlorenceVL


def build_strategy(name: str, model: FlorenceVL, gradient_checkpointing: bool = False) -> Any:
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    classes = model.fsdp_wrap_classes()
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if gradient_checkpointing else None,
        sharding_strategy="FULL_SHARD",
        state_dict_type="full",
        use_orig_params=True,
    )


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters and gradients over ranks (FSDP, DeepSpeed)."""
    name = type(strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name
