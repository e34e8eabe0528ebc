"""Checkpoints of a run: Lightning's full state (``.ckpt``: weights, optimizer, schedule, step) for exact
resumption, written atomically, plus the model alone as safetensors beside each (``.safetensors``: what
finetune, eval and export read; no pickle). Also: where a run starts (resume, init) - run folders
themselves belong to ``fvl.runs.RunDir``."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fvl.models.checkpoint import save_checkpoint
from fvl.runs import RunDir, resolve_weights
from fvl.tracking import tracking_uri
from fvl.train.strategy import is_sharded

if TYPE_CHECKING:
    from fvl.config import ExperimentConfig

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same folder and renames it: a crash never leaves a truncated
    checkpoint under the final name. Loads with ``weights_only=True`` (no arbitrary pickles)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            _atomic_save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class FVLCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes the model as safetensors next to each ``.ckpt``."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and not is_sharded(trainer.strategy):
            save_checkpoint(
                trainer.lightning_module.model,
                Path(filepath).with_suffix(".safetensors"),
                extra_metadata={"global_step": str(trainer.global_step)},
            )
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        sibling = Path(filepath).with_suffix(".safetensors")
        if trainer.is_global_zero and sibling.exists():
            sibling.unlink()


@dataclass
class Start:
    """Where a run starts: its folder, the ``.ckpt`` it resumes (if any) and the weights it is initialised
    from (if any) with their MLflow run."""

    run: RunDir
    resume_ckpt: Path | None = None
    init_weights: Path | None = None
    init_run_id: str = ""

    @property
    def resumed(self) -> bool:
        return self.resume_ckpt is not None


def resolve_start(cfg: ExperimentConfig) -> Start:
    """The run folder and starting point of ``cfg``: ``resume`` continues a run in its own folder; otherwise
    a new folder, initialised from ``init_from`` when set."""
    if cfg.resume:
        ckpt, run = resolve_resume(cfg.resume, cfg.output_dir, cfg.name, cfg.stage.name)
        return Start(run, resume_ckpt=ckpt)
    start = Start(RunDir.create(cfg.output_dir, cfg.name, cfg.stage.name))
    if cfg.init_from:
        start.init_weights, start.init_run_id = resolve_init(
            cfg.init_from, cfg.output_dir, cfg.stage.init_stage, tracking_uri(cfg.tracking)
        )
    elif cfg.stage.init_stage:
        log.warning("stage %r starts from the model's own initialisation (no init_from)", cfg.stage.name)
    return start


def resolve_init(
    init_from: str, output_dir: str | Path, init_stage: str = "", tracking: str | None = None
) -> tuple[Path, str]:
    """``(weights path, source run id or '')`` for ``init_from``: a path, a run folder, ``latest`` (the newest
    run of ``init_stage``) or ``mlflow:RUN_ID`` (looked up in the store ``tracking``)."""
    if init_from == "latest":
        if not init_stage:
            raise ValueError("init_from=latest needs the stage's init_stage (which stage to start from)")
        try:
            run = RunDir.latest(output_dir, stage=init_stage)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"init_from=latest: no {init_stage} run under {output_dir}/ - train that stage first"
            ) from None
        return run.model_weights(), run.mlflow_run_id
    if init_from.startswith("mlflow:"):
        from mlflow.tracking import MlflowClient

        run_id = init_from.split(":", 1)[1]
        path = MlflowClient(tracking).get_run(run_id).data.tags.get("checkpoint_path")
        if not path:
            raise FileNotFoundError(f"init_from={init_from}: the run has no checkpoint_path tag")
        return Path(path), run_id
    if not Path(init_from).exists():
        raise FileNotFoundError(f"init_from={init_from}: no such file or run folder")
    path = resolve_weights(init_from)
    run = RunDir.of(path)
    return path, run.mlflow_run_id if run else ""


def resolve_resume(resume: str, output_dir: str | Path, name: str, stage: str) -> tuple[Path, RunDir]:
    """The ``.ckpt`` to resume and its run (``last``: the newest run of this name and stage that has one)."""
    if resume == "last":
        for run in RunDir.find(output_dir, stage=stage, name=name):
            if run.ckpt("last").exists():
                return run.ckpt("last"), run
        raise FileNotFoundError(
            f"resume=last: no last.ckpt of a {stage} run named {name!r} under {output_dir}/"
        )
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint")
    run = RunDir.of(path)
    if run is None:
        raise FileNotFoundError(f"resume={resume}: the checkpoint is not inside a run folder")
    return path, run
