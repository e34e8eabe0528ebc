"""One training run from a config: ``train(cfg)`` sets up the stage module, data, MLflow logger,
checkpoints and the Lightning Trainer, fits, and returns (and prints) a summary."""

from __future__ import annotations

import datetime as dt
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from fvl.config import to_yaml
from fvl.data.datamodule import FVLDataModule
from fvl.models.checkpoint import save_checkpoint
from fvl.train.checkpointing import (
    AtomicCheckpointIO,
    FVLCheckpoint,
    resolve_init,
    resolve_resume,
    write_run_info,
)
from fvl.train.module import STAGE_MODULES
from fvl.train.strategy import build_strategy
from fvl.train.tracking import log_setup, make_logger, tracking_uri

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str
    checkpoint: Path | None
    best_checkpoint: Path | None
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    info: dict[str, Any] = field(default_factory=dict)


def resolve_hardware(trainer_cfg) -> tuple[str, int, str]:
    """``(accelerator, devices per node, precision)`` with ``auto`` made concrete, so the world size (and
    from it the gradient accumulation) is known before the Trainer exists."""
    accelerator = trainer_cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    devices = trainer_cfg.devices
    if devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    devices = int(devices)
    precision = trainer_cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" and torch.cuda.is_bf16_supported() else "32-true"
    return accelerator, devices, precision


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not a multiple of data.batch_size={micro_batch} x "
            f"{world_size} device(s): change one of them"
        )
    return global_batch // per_step


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> RunResult:
    """Run ``cfg`` (a loaded experiment config) to ``trainer.max_steps`` and return its summary."""
    L.seed_everything(cfg.seed, workers=True)
    resume_ckpt, resume_info = (
        resolve_resume(cfg.resume, cfg.output_dir, cfg.name, cfg.stage) if cfg.resume else (None, {})
    )
    init_path, init_run = (None, "")
    if cfg.init_from and not resume_ckpt:
        init_path, init_run = resolve_init(cfg.init_from, cfg.output_dir, tracking_uri(cfg))
    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir = Path(resume_info.get("run_dir") or Path(cfg.output_dir) / f"{cfg.name}-{cfg.stage}-{started}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))

    module = STAGE_MODULES.get(cfg.stage)(cfg, str(init_path) if init_path else None)
    datamodule = FVLDataModule(cfg.data, module.model, cfg.stage, cfg.seed)
    accelerator, devices, precision = resolve_hardware(cfg.trainer)
    world = devices * cfg.trainer.num_nodes
    accumulate = gradient_accumulation(cfg.train.global_batch_size, cfg.data.batch_size, world)

    logger = make_logger(cfg, run_id=resume_info.get("mlflow_run_id"))
    info = {
        "name": cfg.name, "stage": cfg.stage, "run_dir": str(run_dir), "mlflow_run_id": logger.run_id,
        "started": resume_info.get("started", started), "init_from": str(init_path or ""), "init_run_id": init_run,
    }  # fmt: skip
    ckpt_dir = run_dir / "checkpoints"
    validate = cfg.data.val_samples > 0
    losses: list[torch.Tensor] = []
    cbs: list[L.Callback] = [_LossRecorder(losses)]
    if cfg.train.checkpoint_every_n_steps:  # "last" overwritten every N steps (and always at the end)
        cbs.append(FVLCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=cfg.train.checkpoint_every_n_steps,
                                 save_top_k=1, enable_version_counter=False))  # fmt: skip
    if validate and cfg.train.val_every_n_steps:
        cbs.append(
            FVLCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor="val/loss",
                mode="min",
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    if cfg.trainer.progress:
        from fvl.train.progress import StepProgressBar

        cbs.append(StepProgressBar(leave=True))
    cbs += callbacks or []
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg.trainer.strategy, module.model, cfg.model.llm.gradient_checkpointing),
        precision=precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.train.grad_clip or None,
        logger=logger,
        callbacks=cbs,
        log_every_n_steps=cfg.train.log_every_n_steps,
        val_check_interval=(cfg.train.val_every_n_steps * accumulate)
        if validate and cfg.train.val_every_n_steps
        else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if validate and cfg.train.val_every_n_steps else 0,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()] if "deepspeed" not in cfg.trainer.strategy else None,
        use_distributed_sampler=False,  # shards are split by rank and worker in the data pipeline
        enable_progress_bar=cfg.trainer.progress,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        write_run_info(run_dir, info)
        if resume_ckpt:  # params of a run are immutable in MLflow: record the resumption instead
            logger.experiment.set_tag(logger.run_id, "resumed_from", str(resume_ckpt))
        else:
            log_setup(logger, cfg, run_dir, module.trainable_counts)
            logger.log_hyperparams({"model.num_image_tokens": module.model.num_image_tokens})
        logger.experiment.set_tag(logger.run_id, "run_dir", str(run_dir))
        if init_run:
            logger.experiment.set_tag(logger.run_id, "pretrain_run_id", init_run)
        logger.experiment.set_tag(logger.run_id, "grad_accumulation", str(accumulate))

    # Frozen components run in eval mode on purpose (no dropout / drop-path in a frozen tower).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    start = time.perf_counter()
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None, weights_only=True
    )
    seconds = time.perf_counter() - start

    val_loss = None
    if validate:
        metrics = trainer.validate(module, datamodule=datamodule, verbose=False)
        val_loss = float(metrics[0]["val/loss"]) if metrics else None
    last = ckpt_dir / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)
    last_weights = ckpt_dir / "last.safetensors"
    best = ckpt_dir / "best.safetensors"
    if trainer.is_global_zero:
        save_checkpoint(module.model, last_weights, extra_metadata={"global_step": str(trainer.global_step)})
    trainer.strategy.barrier()

    first_loss = float(torch.stack(losses[:10]).mean()) if losses else None
    last_loss = float(torch.stack(losses[-10:]).mean()) if losses else None
    result = RunResult(run_dir, logger.run_id, last_weights, best if best.exists() else None, trainer.global_step,
                       seconds, first_loss, last_loss, val_loss, info)  # fmt: skip
    if trainer.is_global_zero:
        chosen = best if best.exists() else last_weights
        client, rid = logger.experiment, logger.run_id
        client.set_tag(rid, "checkpoint_path", str(chosen.resolve()))
        client.set_tag(rid, "last_checkpoint_path", str(last_weights.resolve()))
        client.set_tag(rid, "skipped_samples", str(module.skipped_total))
        if val_loss is not None:
            client.log_metric(rid, "val/final_loss", val_loss, step=trainer.global_step)
        info.update({"finished": dt.datetime.now().isoformat(), "steps": trainer.global_step,
                     "checkpoint": str(chosen), "first_loss": first_loss, "last_loss": last_loss, "val_loss": val_loss})  # fmt: skip
        write_run_info(run_dir, info)
    logger.finalize("success")
    return result


class _LossRecorder(L.Callback):
    """Keeps the per-batch training loss for the run's closing summary."""

    def __init__(self, sink: list[torch.Tensor]) -> None:
        self.sink = sink

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.sink.append(loss.detach().float().cpu())


def print_summary(result: RunResult, tracking: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"fvl run finished: {result.info.get('name')} ({result.info.get('stage')})", show_header=False
    )
    table.add_row("run folder", str(result.run_dir))
    table.add_row("steps / time", f"{result.steps} steps in {result.seconds:.0f} s")
    if result.first_loss is not None and result.last_loss is not None:
        table.add_row(
            "train loss",
            f"{result.first_loss:.3f} -> {result.last_loss:.3f} ({result.last_loss / result.first_loss:.0%} of the first)",
        )
    if result.val_loss is not None:
        table.add_row("val loss", f"{result.val_loss:.3f}")
    table.add_row("checkpoint", str(result.best_checkpoint or result.checkpoint))
    table.add_row("MLflow run", f"{result.mlflow_run_id} in {tracking}")
    table.add_row("MLflow UI", "make mlflow-ui  ->  http://127.0.0.1:5000")
    Console().print(table)
