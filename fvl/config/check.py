"""The checks that span sections of an experiment, in one pass after the sections checked themselves.

Pure: they read the typed config only (no model, no other config, no disk). The checks that need the code a
config names (registered names, the image-token budget of a tower and a fusion) are ``fvl.models.check``'s,
run before a model or processor is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fvl.config.experiment import ExperimentConfig


def check(exp: ExperimentConfig) -> None:
    """Raise ValueError naming the keys that do not fit together."""
    if exp.init_from == "latest" and not exp.stage.init_stage:
        raise ValueError(
            f"init_from=latest: stage {exp.stage.name!r} names no stage.init_stage to start from"
        )
    if exp.model.llm.quantization != "none" and not exp.train.lora.enabled:
        raise ValueError(
            "model.llm.quantization=nf4 (QLoRA) needs train.lora.enabled=true: 4-bit weights cannot train"
        )
    if exp.train.lora.enabled and exp.trainer.strategy == "fsdp":
        raise ValueError(
            "train.lora.enabled with trainer.strategy=fsdp is not supported yet (a LoRA checkpoint is merged "
            "from the unsharded model): use trainer.strategy=ddp"
        )
    if exp.train.global_batch_size % exp.data.batch_size:
        raise ValueError(
            f"train.global_batch_size={exp.train.global_batch_size} is not a multiple of "
            f"data.batch_size={exp.data.batch_size}"
        )
    towers = exp.model.vision.all_towers()
    named = [c.partition(".")[2] for c in exp.stage.trainable if c.startswith("vision.")]
    missing = [t for t in named if t not in towers]
    if missing:
        raise ValueError(
            f"stage.trainable names towers {missing} that the model does not have; its towers: {', '.join(towers)}"
        )
    if exp.trainer.fsdp_gather_dtype == "bfloat16" and exp.trainer.precision not in ("bf16-mixed", "auto"):
        raise ValueError(
            f"trainer.fsdp_gather_dtype=bfloat16 computes with bf16 weights under autocast: it needs "
            f"trainer.precision=bf16-mixed, not {exp.trainer.precision}"
        )
