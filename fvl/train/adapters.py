"""LoRA (peft) on the LLM, and QLoRA when the LLM was loaded in 4-bit NF4 (``model.llm.quantization``)."""

from __future__ import annotations

import logging

from fvl.config.train import LoraConfig
from fvl.models.florence_vl import FlorenceVL

log = logging.getLogger(__name__)


def apply_lora(model: FlorenceVL, cfg: LoraConfig) -> None:
    """Wrap ``model.llm`` in LoRA adapters; afterwards only ``lora_`` parameters of the LLM train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    llm = model.llm
    if getattr(llm, "is_loaded_in_4bit", False):
        llm = prepare_model_for_kbit_training(
            llm, use_gradient_checkpointing=model.cfg.llm.gradient_checkpointing
        )
    targets = list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(llm, peft_cfg)
    log.info("LoRA on the LLM: %s", peft_cfg.target_modules)
