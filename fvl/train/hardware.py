"""``trainer:`` made concrete on this machine: ``auto`` accelerator, devices and precision resolved, so the world
size (and from it the gradient accumulation) is known before the Trainer exists; the strategy name checked
against Lightning's registry."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.strategies import StrategyRegistry

from fvl.config.train import TrainerConfig

log = logging.getLogger(__name__)


def check_strategy(cfg: TrainerConfig) -> None:
    """ValueError unless ``trainer.strategy`` is ``auto`` or a strategy Lightning knows that fvl supports.
    DeepSpeed is refused: fvl does not test it (its engine scales the loss for accumulation itself, which the
    token-weighted step loss would then scale twice); use ``fsdp`` (sharded) or ``ddp``."""
    if cfg.strategy.startswith("deepspeed"):
        raise ValueError(
            f"trainer.strategy={cfg.strategy!r}: DeepSpeed is not supported (untested; its loss scaling differs): "
            "use trainer.strategy=fsdp (sharded parameters, gradients and optimizer state) or ddp"
        )
    known = ["auto", *StrategyRegistry.available_strategies()]
    if cfg.strategy not in known:
        raise ValueError(f"trainer.strategy={cfg.strategy!r}: expected one of {', '.join(sorted(known))}")


def resolve_hardware(cfg: TrainerConfig) -> tuple[str, int, str]:
    """``(accelerator, devices per node, precision)`` with ``auto`` made concrete."""
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        if accelerator == "cpu" and torch.version.cuda is None and _gpu_present():
            log.warning(
                "\n!! A GPU is present (nvidia-smi lists one) but this torch %s is a CPU build: training runs on "
                "the CPU.\n!! Install a CUDA build of torch (make: TORCH=...) or set trainer.accelerator=cpu "
                "to silence this.\n",
                torch.__version__,
            )
    devices = cfg.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" and torch.cuda.is_bf16_supported() else "32-true"
    return accelerator, int(devices), precision


def world_size(cfg: TrainerConfig) -> int:
    """Processes of the run: devices per node x nodes."""
    return resolve_hardware(cfg)[1] * cfg.num_nodes


def _gpu_present() -> bool:
    """Whether ``nvidia-smi`` lists a GPU (for the warning about a CPU-only torch on a GPU machine)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "GPU" in out
