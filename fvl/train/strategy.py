"""Lightning strategies from a name in YAML.

``fsdp`` is fully sharded data parallelism with PyTorch's FSDP2 (``fully_shard``) through Lightning's
``ModelParallelStrategy``: every parameter is sharded on its own (a DTensor keeping its name and shape), so
float32 trainable and bf16 frozen weights may share a unit, the weight-decay groups still see 2-D weights,
and it also runs on CPU with gloo (the tests' stand-in; FSDP1 needs an accelerator). The wrap units are the
model's own repeated blocks (``FlorenceVL.fsdp_wrap_classes``), then the rest of the model as the root
unit. Periodic checkpoints are sharded (a folder per ``.ckpt``); the run's final safetensors is consolidated
once, by every rank. Activation checkpointing is the LLM's own (``model.llm.gradient_checkpointing``), never a
second mechanism on top. Every other name goes to Lightning as it is (``ddp``, ``deepspeed_stage_2`` ...).

Two FSDP2 settings trade memory for communication (``trainer.fsdp_reduce``, ``trainer.fsdp_gather_dtype``;
BENCHMARKS.md's many-GPU model says when they pay): ``fsdp_reduce=step`` reduce-scatters the gradients once
per optimizer step instead of after every micro batch (Lightning skips the reduction of accumulating micro
batches for DDP only), keeping each rank's unsharded gradients between them (one float32 copy of what
trains); ``fsdp_gather_dtype=bfloat16`` gathers the parameters in bf16 (FSDP2's mixed-precision
``param_dtype``; gradients are still reduced in float32 onto the float32 master weights), half the bytes of
every gather, the layers then computing with bf16 weights throughout (norms included, where autocast alone
keeps float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from fvl.models import FlorenceVL

FSDP_REDUCE = ("micro_batch", "step")
FSDP_GATHER_DTYPES = ("float32", "bfloat16")


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy (``ModelParallelStrategy``, data parallel only); with ``fsdp_reduce=step``
    the micro batches of an accumulation that are not its last keep their gradients unreduced (see the
    module docstring)."""

    def __init__(self, world_size: int, fsdp_reduce: str = "micro_batch") -> None:
        if fsdp_reduce not in FSDP_REDUCE:
            raise ValueError(f"FSDP reduce {fsdp_reduce!r}: expected one of {', '.join(FSDP_REDUCE)}")
        super().__init__(
            data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True
        )
        self.fsdp_reduce = fsdp_reduce

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        if self.fsdp_reduce != "step":
            yield None
            return
        with deferred_gradient_sync(self.model):
            yield None


def build_strategy(name: str, world_size: int = 1, fsdp_reduce: str = "micro_batch") -> Any:
    """``fsdp``: fvl's FSDP2 (``FSDPStrategy``); any other name goes to Lightning as it is."""
    if name != "fsdp":
        return name
    return FSDPStrategy(world_size, fsdp_reduce)


@contextmanager
def deferred_gradient_sync(module: Any) -> Iterator[None]:
    """Inside: the FSDP2 units under ``module`` accumulate unsharded gradients instead of reduce-scattering
    them after backward; the next backward outside reduces what was accumulated with its own."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield None
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def shard_model(
    model: FlorenceVL, mesh: Any, gather_dtype: str = "float32", cpu_offload: bool = False
) -> FlorenceVL:
    """FSDP2: each repeated block its own unit, then the whole model (embeddings, projector, heads).
    ``gather_dtype=bfloat16``: parameters are gathered (and computed with) in bf16, gradients reduced in
    float32. ``cpu_offload``: the sharded parameters, their gradients and the optimizer's state live in CPU
    memory (FSDP2's ``CPUOffloadPolicy``; the optimizer steps there), copied to the GPU unit by unit."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if gather_dtype not in FSDP_GATHER_DTYPES:
        raise ValueError(
            f"FSDP gather dtype {gather_dtype!r}: expected one of {', '.join(FSDP_GATHER_DTYPES)}"
        )
    extra: dict[str, Any] = {}
    if cpu_offload:
        if not torch.cuda.is_available():
            raise ValueError(
                "trainer.fsdp_cpu_offload moves state off a GPU's memory: this machine has no GPU"
            )
        extra["offload_policy"] = CPUOffloadPolicy()
    if gather_dtype == "bfloat16":
        extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    classes = model.fsdp_wrap_classes()
    for module in model.modules():
        if type(module) in classes:
            fully_shard(module, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)
    return model


def is_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` shards parameters and gradients over ranks (FSDP, DeepSpeed)."""
    name = type(strategy).__name__.lower()
    return "fsdp" in name or "deepspeed" in name or "modelparallel" in name


def local(tensor: Any) -> Any:
    """This rank's shard of a DTensor (a sharded parameter or gradient); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
