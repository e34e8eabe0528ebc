"""Lightning strategies from a name in YAML. ``fsdp`` is given the model's own layer classes as wrap units
(the LLM's ``_no_split_modules``, DaViT blocks, encoder layers), ``use_orig_params`` so that frozen and
trainable parameters can share a unit; every other name goes to Lightning as it is (``ddp``,
``deepspeed_stage_2``, ``deepspeed_stage_3`` ...)."""

from __future__ import annotations

from typing import Any

from torch import nn

VISION_BLOCKS = ("Florence2VisionBlock", "BartEncoderLayer", "CLIPEncoderLayer", "SiglipEncoderLayer")


def layer_classes(model: nn.Module) -> set[type]:
    """Classes of the repeated layers: the wrap (and activation checkpointing) units for FSDP."""
    names = set(VISION_BLOCKS)
    llm = getattr(model, "llm", None)
    names |= set(getattr(llm, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def build_strategy(name: str, model: nn.Module, gradient_checkpointing: bool = False) -> Any:
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    classes = layer_classes(model)
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if gradient_checkpointing else None,
        sharding_strategy="FULL_SHARD",
        state_dict_type="full",
        use_orig_params=True,
    )
