"""One training run from a config, as a linear sequence of named steps:

``resolve_start`` (resume or init, the run folder) -> ``build_module`` -> ``build_datamodule`` ->
``build_callbacks`` -> ``build_trainer`` -> fit -> ``finish`` (final validation, last checkpoint, summary).
MLflow belongs to ``TrackingCallback``; the run folder to ``RunDir``; derived values (gradient accumulation,
hardware) to the config classes.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fvl.config import ExperimentConfig, to_yaml
from fvl.data.datamodule import FVLDataModule
from fvl.data.datamodule import build_datamodule as data_module_of
from fvl.data.feature_cache.store import identity_of
from fvl.data.recipes import resolve_recipe_path
from fvl.models.check import check as check_model
from fvl.runs.folder import is_rank_zero
from fvl.train.checkpointing import (
    AtomicCheckpointIO,
    FVLCheckpoint,
    Start,
    resolve_start,
    save_gathered_weights,
    save_pair,
)
from fvl.train.eval_during_training import EvalDuringTraining
from fvl.train.hardware import check_strategy, resolve_hardware, world_size
from fvl.train.module import FVLModule, build_module
from fvl.train.strategy import build_strategy, is_sharded
from fvl.train.timing import StepTimes
from fvl.train.tracking import TrackingCallback, make_logger
from fvl.util.threads import beside_workers, torch_threads

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str
    checkpoint: Path
    best_checkpoint: Path | None
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    info: dict[str, Any] = field(default_factory=dict)


def train(exp: ExperimentConfig, callbacks: list[L.Callback] | None = None) -> RunResult:
    """Run ``exp`` (a loaded experiment config) to ``trainer.max_steps`` and return its summary."""
    check_strategy(exp.trainer)
    check_model(exp.model)  # wrong names or a token budget that does not fit fail here, before a run folder
    resolve_recipe_path(exp.data.recipe)  # so does a wrong recipe name
    L.seed_everything(exp.seed, workers=True)
    start = resolve_start(exp)
    with start.run.shared(), cpu_threads(exp):
        return _run(exp, start, callbacks or [])


def cpu_threads(cfg: ExperimentConfig):
    """``trainer.cpu_threads`` for the run when it trains on a CPU (-1: a core left to each loader worker);
    the thread count is restored after."""
    threads = cfg.trainer.cpu_threads
    if threads == -1:
        threads = beside_workers(cfg.data.num_workers)
    if threads and resolve_hardware(cfg.trainer)[0] == "cpu":
        log.info("%d training thread(s) beside %d loader worker(s)", threads, cfg.data.num_workers)
        return torch_threads(threads)
    return torch_threads(0)


def _run(exp: ExperimentConfig, start: Start, callbacks: list[L.Callback]) -> RunResult:
    if is_rank_zero():
        start.run.write_config(to_yaml(exp))
    log.info("run folder %s", start.run.path)

    module = build_module(exp, str(start.init_weights) if start.init_weights else None)
    datamodule = build_datamodule(exp, module)
    accumulate = exp.gradient_accumulation(world_size(exp.trainer))
    datamodule.step_batches = accumulate
    tracker = TrackingCallback(exp, start, accumulate)
    losses = LossRecorder()
    trainer = build_trainer(exp, start, module, [*build_callbacks(exp, start), tracker, losses, *callbacks])

    # Frozen components run in eval mode on purpose (no dropout / drop-path in a frozen tower).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    began = time.perf_counter()
    ckpt_path = str(start.resume_ckpt) if start.resume_ckpt else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    seconds = time.perf_counter() - began
    result = finish(exp, start, trainer, module, datamodule, losses, seconds)
    tracker.record_result(trainer, result)
    result.info = start.run.info
    if trainer.logger:
        trainer.logger.finalize("success")
    return result


def build_datamodule(cfg: ExperimentConfig, module: FVLModule) -> FVLDataModule:
    """The stage's data, prepared by the model's processor with the stage's resize mode; with
    ``data.feature_cache``, read from a cache that must match the model's tower and fusion."""
    identity = None
    if cfg.data.feature_cache:
        model = module.model
        if not model.features_frozen():
            raise ValueError(
                f"data.feature_cache: stage {cfg.stage.name!r} trains "
                f"{[c for c in cfg.stage.trainable if c.startswith(('vision', 'fusion'))]}, so the fused features change "
                "as it trains; a cache holds a frozen tower's features (use it in finetune or align)"
            )
        identity = identity_of(model, cfg.stage.resize_mode)
    return data_module_of(
        cfg, processor=module.model.processor, feature_identity=identity, fusion=module.model.fusion
    )


_ONE_FILE = {"save_top_k": 1, "enable_version_counter": False}  # one file per name, overwritten


def build_callbacks(cfg: ExperimentConfig, start: Start) -> list[L.Callback]:
    """Checkpoints (``last`` every ``checkpoint_every_n_steps``, ``best`` by validation loss), benchmark
    scores while training (``eval.during_training``) and the progress bar."""
    folder = start.run.checkpoints
    callbacks: list[L.Callback] = []
    if cfg.train.checkpoint_every_n_steps:  # "last", overwritten every N steps (and always at the end)
        every = cfg.train.checkpoint_every_n_steps
        callbacks.append(
            FVLCheckpoint(
                dirpath=folder,
                filename="last",
                every_n_train_steps=every,
                save_top_k=1,
                enable_version_counter=False,
            )  # fmt: skip
        )
    if cfg.validates and cfg.train.val_every_n_steps:
        callbacks.append(
            FVLCheckpoint(
                dirpath=folder,
                filename="best",
                monitor="val/loss",
                mode="min",
                save_top_k=1,
                enable_version_counter=False,
            )  # fmt: skip
        )
    callbacks.append(StepTimes())
    if cfg.eval.during_training.enabled:
        callbacks.append(EvalDuringTraining(cfg, start.run))
    if cfg.trainer.progress:
        from fvl.train.progress import StepProgressBar

        callbacks.append(StepProgressBar(leave=True))
    return callbacks


def build_trainer(
    cfg: ExperimentConfig, start: Start, module: FVLModule, callbacks: list[L.Callback]
) -> L.Trainer:
    """The Lightning Trainer of ``cfg.trainer`` with the step-based schedule of ``cfg.train``."""
    accelerator, devices, precision = resolve_hardware(cfg.trainer)
    accumulate = cfg.gradient_accumulation(world_size(cfg.trainer))
    periodic_val = cfg.validates and cfg.train.val_every_n_steps > 0
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg.trainer.strategy, world_size(cfg.trainer), cfg.trainer.fsdp_reduce),
        precision=precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.train.grad_clip or None,
        # Only global rank 0 talks to MLflow: ranks that start together (torchrun) must not race to set up
        # a SQLite store, and the other ranks' metrics are rank 0's anyway.
        logger=make_logger(
            cfg, run_id=start.run.mlflow_run_id if start.resumed else None, run_dir=start.run.path
        )
        if is_rank_zero()
        else False,
        callbacks=callbacks,
        log_every_n_steps=cfg.train.log_every_n_steps,
        val_check_interval=cfg.train.val_every_n_steps * accumulate if periodic_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if periodic_val else 0,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()]
        if cfg.trainer.strategy not in ("fsdp",) and "deepspeed" not in cfg.trainer.strategy
        else None,
        use_distributed_sampler=False,  # each rank's share is planned by the data module (fvl.data.plan)
        enable_progress_bar=cfg.trainer.progress,
        enable_model_summary=False,
        default_root_dir=str(start.run.path),
    )


def finish(
    cfg: ExperimentConfig,
    start: Start,
    trainer: L.Trainer,
    module: FVLModule,
    datamodule: FVLDataModule,
    losses: LossRecorder,
    seconds: float,
) -> RunResult:
    """Final validation, the ``last`` checkpoint (full state and model weights) and the run's summary."""
    val_loss = None
    if cfg.validates:
        metrics = trainer.validate(module, datamodule=datamodule, verbose=False)
        val_loss = float(metrics[0]["val/loss"]) if metrics else None
    run = start.run
    save_pair(trainer, module.model, run.ckpt("last"), {"global_step": str(trainer.global_step)})
    if is_sharded(trainer.strategy):  # the model weights of a sharded run: gathered once, at the end
        save_gathered_weights(
            trainer, module.model, run.weights("last"), {"global_step": str(trainer.global_step)}
        )
    best = run.weights("best")
    first, last = losses.summary()
    return RunResult(
        run_dir=run.path,
        mlflow_run_id=trainer.logger.run_id if trainer.logger else "",
        checkpoint=run.weights("last"),
        best_checkpoint=best if best.exists() else None,
        steps=trainer.global_step,
        seconds=seconds,
        first_loss=first,
        last_loss=last,
        val_loss=val_loss,
        info=run.info,
    )


class LossRecorder(L.Callback):
    """Keeps the first and the last ``window`` optimizer steps' losses (``FVLModule.step_loss``: the loss of the
    whole step over all ranks, what ``train/loss`` logs) on the device, without a host sync per step, for the
    closing summary."""

    def __init__(self, window: int = 10) -> None:
        self.first: list[torch.Tensor] = []
        self.last: deque[torch.Tensor] = deque(maxlen=window)
        self.window = window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = getattr(pl_module, "step_loss", None)  # set at a step's last micro batch
        if loss is None:
            return
        pl_module.step_loss = None
        if len(self.first) < self.window:
            self.first.append(loss)
        self.last.append(loss)

    def summary(self) -> tuple[float | None, float | None]:
        """Mean of the first and of the last ``window`` losses."""
        if not self.first:
            return None, None
        return float(torch.stack(self.first).mean()), float(torch.stack(list(self.last)).mean())


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
