"""Typed schema of the training sections of an experiment YAML: ``train:`` and ``trainer:``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")
LOSS_NORMALIZATIONS = ("step_tokens", "micro_batch")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


@dataclass
class LoraConfig:
    """Parameter-efficient finetuning of the LLM with peft.

    enabled: wrap the LLM's linear layers in LoRA adapters (the base weights freeze; adapters train).
    r: adapter rank. alpha: scaling numerator (LoRA scales by alpha / r). dropout: on the adapter input.
    target_modules: module names to adapt (``all-linear`` = every linear layer but the output head).
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("train.lora: r and alpha must be positive, dropout in [0, 1)")


@dataclass
class TrainConfig:
    """Optimisation.

    lr: peak learning rate of the projector and LLM.
    vision_lr: peak learning rate of the vision tower when the stage trains it (null: ``lr``).
    weight_decay: AdamW weight decay (0 in the paper's recipe); never applied to biases and norms.
    betas: AdamW betas.
    warmup_ratio: linear warm-up over this fraction of the steps, then cosine decay to 0.
    global_batch_size: samples per optimizer step over all devices and nodes; gradient accumulation is
      derived from it and ``data.batch_size`` (it must divide evenly).
    grad_clip: clip the global gradient norm to this (0: off).
    optimizer: ``adamw`` (torch, its multi-tensor ``foreach`` kernels) | ``adamw_fused`` (torch's fused
      kernel: one launch per parameter group, for parameters on a GPU) | ``adamw_8bit`` (bitsandbytes).
    lora: see ``LoraConfig``.
    log_every_n_steps: how often metrics go to MLflow.
    val_every_n_steps: validation interval in optimizer steps (0: only at the end).
    checkpoint_every_n_steps: write ``last`` every this many steps (0: only at the end).
    loss_normalization: how an optimizer step weighs its tokens. ``step_tokens`` (default): the step's loss
      and gradient are the mean over every supervised token of all its micro batches on all ranks, the
      loss of one big batch whatever the micro batch, accumulation and world size (the supervised tokens are
      counted before the step: one all-reduce of an integer). ``micro_batch``: each micro batch's own mean,
      averaged over micro batches and ranks (LLaVA's and the authors' rule: a token in a short micro batch
      weighs more; use it to match LLaVA-era runs).
    nonfinite_loss: a micro batch whose loss is NaN or infinite (on any rank): ``skip`` it (no backward, so
      it never reaches the weights; counted as ``train/nonfinite_skipped`` with a warning) | ``stop`` the run
      with an error. The check costs one host sync per micro batch.
    """

    lr: float = 3e-4
    vision_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    global_batch_size: int = 32
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    lora: LoraConfig = field(default_factory=LoraConfig)
    log_every_n_steps: int = 10
    val_every_n_steps: int = 0
    checkpoint_every_n_steps: int = 0
    loss_normalization: str = "step_tokens"
    nonfinite_loss: str = "skip"

    def __post_init__(self) -> None:
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"train.loss_normalization={self.loss_normalization!r}: expected one of {', '.join(LOSS_NORMALIZATIONS)}"
            )
        if self.nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"train.nonfinite_loss={self.nonfinite_loss!r}: expected skip or stop")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or (self.vision_lr is not None and self.vision_lr < 0):
            raise ValueError("train.lr must be positive and train.vision_lr non-negative")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("train.warmup_ratio must be in [0, 1)")
        if self.global_batch_size <= 0:
            raise ValueError("train.global_batch_size must be positive")
        if len(self.betas) != 2:
            raise ValueError("train.betas needs two values")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("train.grad_clip and train.weight_decay must be >= 0")
        if self.log_every_n_steps <= 0:
            raise ValueError(f"train.log_every_n_steps={self.log_every_n_steps}: must be positive")
        for key in ("val_every_n_steps", "checkpoint_every_n_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)}: must be >= 0 (0: only at the end)")


@dataclass
class TrainerConfig:
    """The Lightning Trainer.

    max_steps: optimizer steps of the run (also the length of the LR schedule).
    accelerator: ``auto`` | ``cpu`` | ``gpu``.
    devices: devices per node: ``auto`` or a count.
    num_nodes: nodes.
    strategy: ``auto``, ``ddp`` or ``fsdp`` (fvl's FSDP2 wrapping; both tested on two processes); another Lightning
      strategy name is passed through, except DeepSpeed's (refused: untested).
    precision: ``auto`` (bf16-mixed where the hardware supports it, else 32-true) or a Lightning precision
      (``bf16-mixed``: autocast over float32 weights; ``32-true``).
    progress: show the Rich progress bar.
    cpu_threads: torch's intra-op threads when training on a CPU: 0 keeps torch's default (one per core),
      -1 leaves a core to each DataLoader worker (cores - ``data.num_workers``, at least 1), N sets N. On
      few cores workers and threads contend: the tiny finetune, whose worker tokenises while its step is
      light, ran 1.2x faster on 2 cores with -1; the pretrain, whose step is heavy, ran slower.
    fsdp_reduce: with ``strategy=fsdp`` and gradient accumulation: ``micro_batch`` reduce-scatters the
      gradients after every micro batch (the least memory); ``step`` once per optimizer step, each rank
      keeping its unsharded float32 gradients in between (one more copy of what trains; far fewer bytes
      across a slow network: BENCHMARKS.md, "Many GPUs").
    fsdp_gather_dtype: with ``strategy=fsdp``: ``float32`` gathers the master weights as they are stored;
      ``bfloat16`` gathers (and computes with) bf16 copies, half the bytes, gradients still reduced in float32.
    fsdp_cpu_offload: with ``strategy=fsdp`` on GPUs: keep the sharded float32 weights, gradients and AdamW's
      moments in CPU memory (the optimizer steps on the CPU), freeing the GPU's for activations.
    """

    max_steps: int = 1000
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    progress: bool = True
    cpu_threads: int = 0
    fsdp_reduce: str = "micro_batch"
    fsdp_gather_dtype: str = "float32"
    fsdp_cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError("trainer.max_steps must be positive")
        if self.cpu_threads < -1:
            raise ValueError("trainer.cpu_threads: 0 (torch's default), -1 (a core per loader worker) or N")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(
                f"trainer.accelerator={self.accelerator!r}: expected one of {', '.join(ACCELERATORS)}"
            )
        if self.devices != "auto" and not (self.devices.isdigit() and int(self.devices) > 0):
            raise ValueError(f"trainer.devices={self.devices!r}: expected auto or a positive count")
        if self.num_nodes <= 0:
            raise ValueError("trainer.num_nodes must be positive")
        if self.fsdp_reduce not in ("micro_batch", "step"):
            raise ValueError(f"trainer.fsdp_reduce={self.fsdp_reduce!r}: expected micro_batch or step")
        if self.fsdp_gather_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"trainer.fsdp_gather_dtype={self.fsdp_gather_dtype!r}: expected float32 or bfloat16"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        # The strategy name is checked against Lightning's registry by ``fvl.train.hardware``.
