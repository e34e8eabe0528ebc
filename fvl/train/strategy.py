"""Lightning strategies from a name in YAML.

``fsdp`` is fully sharded data parallelism with PyTorch's FSDP2 (``fully_shard``) through Lightning's
``ModelParallelStrategy``: every parameter is sharded on its own (a DTensor keeping its name and shape), so
float32 trainable and bf16 frozen weights may share a unit, the weight-decay groups still see 2-D weights,
and it also runs on CPU with gloo (the tests' stand-in; FSDP1 needs an accelerator). The wrap units are the
model's own repeated blocks (``FlorenceVL.fsdp_wrap_classes``), then the rest of the model as the root
unit. Periodic checkpoints are sharded (a folder per ``.ckpt``); the run's final safetensors is consolidated
once, by every rank. Activation checkpointing is the LLM's own (``model.llm.gradient_checkpointing``), never a
second mechanism on top. Every other name goes to Lightning as it is (``ddp``, ``deepspeed_stage_2`` ...).
"""

from __future__ import annotations

from typing import Any

from fvl.models import FlorenceVL


def build_strategy(name: str, world_size: int = 1) -> Any:
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(
        data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True
    )


def shard_model(model: FlorenceVL, mesh: Any) -> FlorenceVL:
    """FSDP2: each repeated block its own unit, then the whole model (embeddings, projector, heads)."""
    from torch.distributed.fsdp import fully_shard

    classes = model.fsdp_wrap_classes()
    for module in model.modules():
        if type(module) in classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters and gradients over ranks (FSDP, DeepSpeed)."""
    name = type(strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name or "modelparallel" in name


def local(tensor: Any) -> Any:
    """This rank's shard of a DTensor (a sharded parameter or gradient); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
