"""liger-kernel's Triton kernels in the LLM's decoder layers (``model.llm.kernels``): ``rms_norm``, ``swiglu``
and ``rope``, each switchable. They replace the modules (RMSNorm, the gated MLP) of this model instance and
the architecture's rotary function, through liger's own ``_apply_liger_kernel_to_instance`` (what transformers'
Trainer calls); its loss patch stays off: fvl computes its loss itself (``model.llm.loss=fused`` for liger's
fused linear cross-entropy). The kernels run on CUDA only (Triton); ``fvl.bench.gpu_round2`` checks each one
against the eager layers on the GPU (no CPU path exists to test them here). The rotary patch is liger's
module-level one: every model of that architecture in the process gets it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

KERNELS = ("rms_norm", "swiglu", "rope")
EXTRA = "fvl[gpu-kernels]"


class KernelsUnavailable(RuntimeError):
    """``model.llm.kernels`` where they cannot run: liger-kernel (or triton) missing, or no CUDA device."""


def apply_kernels(llm: nn.Module, kernels: Sequence[str]) -> list[str]:
    """Put the named liger kernels into ``llm`` (a transformers causal LM); returns what was applied."""
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"model.llm.kernels: unknown {unknown}; known: {', '.join(KERNELS)}")
    if not kernels:
        return []
    import torch

    if not torch.cuda.is_available():
        raise KernelsUnavailable(
            f"model.llm.kernels={list(kernels)}: liger's kernels are Triton GPU kernels and this machine has no "
            "CUDA device; leave model.llm.kernels empty here"
        )
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError as e:
        raise KernelsUnavailable(
            f"model.llm.kernels needs liger-kernel and triton: pip install '{EXTRA}' ({e})"
        ) from e
    model_type = llm.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise KernelsUnavailable(f"liger-kernel has no kernels for model_type={model_type!r}")
    flags = {k: k in kernels for k in KERNELS}
    _apply_liger_kernel_to_instance(model=llm, cross_entropy=False, fused_linear_cross_entropy=False, **flags)
    return list(kernels)
