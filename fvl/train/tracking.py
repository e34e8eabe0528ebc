"""MLflow for training runs: the Lightning logger, and ``TrackingCallback``, which owns every tag, param
and summary metric of a run (per-step metrics are logged by the module through ``self.log``)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from fvl.config import to_dict
from fvl.runs.folder import RunDir
from fvl.runs.tracking import artifact_location, git_commit, tracking_uri
from fvl.train.resilient_logger import ResilientMLFlowLogger

if TYPE_CHECKING:
    from fvl.config import ExperimentConfig
    from fvl.train.checkpointing import Start
    from fvl.train.run import RunResult


def make_logger(
    cfg: ExperimentConfig, run_id: str | None = None, run_dir: str | Path | None = None
) -> ResilientMLFlowLogger:
    """The run's MLflow logger: a new run in ``tracking.experiment``, or ``run_id`` continued (resume). An
    outage of the store mid-run does not stop training (``ResilientMLFlowLogger``; what cannot be written by
    the end goes to ``run_dir``)."""
    uri = tracking_uri(cfg.tracking)
    return ResilientMLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or cfg.run_label,
        tracking_uri=uri,
        tags=run_tags(cfg) if run_id is None else None,
        artifact_location=artifact_location(uri),
        run_id=run_id,
        retry_seconds=cfg.tracking.retry_seconds,
        final_wait_seconds=cfg.tracking.final_wait_seconds,
        unsent_dir=run_dir,
        logged_through=last_logged_step(uri, run_id) if run_id else None,
    )


def last_logged_step(uri: str, run_id: str, metric: str = "train/loss") -> int | None:
    """The last step a run logged ``metric`` at (None when it logged none, or the store does not answer)."""
    from mlflow.tracking import MlflowClient

    try:
        history = MlflowClient(uri).get_metric_history(run_id, metric)
    except Exception:  # noqa: BLE001 - a store that is down now: nothing to skip is the safe side
        return None
    return max((m.step for m in history), default=None)


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """What a run is, as tags to filter and group by: stage, preset, fusion, features, recipe, commit."""
    from pathlib import Path

    m = cfg.model
    tags = {
        "stage": cfg.stage.name,
        "model": m.preset,
        "fusion": m.fusion.name,
        "features": ",".join(m.fusion.features),
        "recipe": Path(cfg.data.recipe).stem,
        "git_commit": git_commit(),
        "experiment_name": cfg.name,
    }
    if cfg.tracking.sweep:
        tags["sweep"] = cfg.tracking.sweep
    tags.update({str(k): str(v) for k, v in cfg.tracking.tags.items()})
    return tags


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b.c": value}`` (lists as JSON), as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


class TrackingCallback(L.Callback):
    """Owns the run's MLflow record and its ``run.json``, on global rank zero.

    ``setup``: every rank adopts rank 0's run folder. ``on_fit_start``: the run's identity (``run.json``), params (the flattened resolved config, trainable
    counts per component, LLM tokens per image), the config as an artifact and the set-up tags - or, on
    resume, a ``resumed_from`` tag (an MLflow run's params are immutable). ``on_fit_end``: steps and skipped
    samples. ``record_result``: the final checkpoint, validation loss and losses, after the run's last save.
    """

    def __init__(self, cfg: ExperimentConfig, start: Start, accumulate: int) -> None:
        self.cfg = cfg
        self.start = start
        self.accumulate = accumulate

    @property
    def run(self) -> RunDir:
        return self.start.run

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Rank 0's folder is the run's: ranks that a launcher such as torchrun started on their own computed
        # folders of their own (never created); from here on every rank writes into rank 0's.
        from pathlib import Path

        self.start.run = RunDir(Path(trainer.strategy.broadcast(str(self.start.run.path), src=0)))

    def _client(self, trainer: L.Trainer) -> tuple[Any, str]:
        logger: MLFlowLogger = trainer.logger  # type: ignore[assignment]
        return _Queued(logger), logger.run_id

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        client, run_id = self._client(trainer)
        info = self.run.info
        self.run.write_info(
            {
                **info,
                "name": self.cfg.name,
                "stage": self.cfg.stage.name,
                "run_dir": str(self.run.path),
                "mlflow_run_id": run_id,
                "init_from": str(self.start.init_weights or info.get("init_from", "")),
                "init_run_id": self.start.init_run_id or info.get("init_run_id", ""),
            }
        )
        if self.start.resumed:
            client.set_tag(run_id, "resumed_from", str(self.start.resume_ckpt))
        else:
            params = flatten(to_dict(self.cfg))
            for component, counts in pl_module.trainable_counts.items():
                for kind, n in counts.items():
                    params[f"params.{component}.{kind}"] = n
            params["model.num_image_tokens"] = pl_module.model.num_image_tokens
            trainer.logger.log_hyperparams(params)
            client.log_artifact(run_id, str(self.run.config_path))
        client.set_tag(run_id, "run_dir", str(self.run.path))
        if self.start.init_run_id:
            client.set_tag(run_id, "init_run_id", self.start.init_run_id)
        client.set_tag(run_id, "grad_accumulation", str(self.accumulate))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        client, run_id = self._client(trainer)
        client.set_tag(run_id, "steps", str(trainer.global_step))
        client.set_tag(run_id, "skipped_samples", str(getattr(pl_module, "skipped_total", 0)))
        for reason, count in sorted(getattr(pl_module, "skipped", {}).items()):
            client.set_tag(run_id, f"skipped.{reason}", str(count))

    def record_result(self, trainer: L.Trainer, result: RunResult) -> None:
        """The run's outcome: checkpoint tags, ``val/final_loss`` and the summary in ``run.json``."""
        if not trainer.is_global_zero:
            return
        client, run_id = self._client(trainer)
        chosen = result.best_checkpoint or result.checkpoint
        client.set_tag(run_id, "checkpoint_path", str(chosen.resolve()))
        client.set_tag(run_id, "last_checkpoint_path", str(result.checkpoint.resolve()))
        if result.val_loss is not None:
            client.log_metric(run_id, "val/final_loss", result.val_loss, step=trainer.global_step)
        self.run.update_info(
            finished=_now(),
            steps=result.steps,
            checkpoint=str(chosen),
            first_loss=result.first_loss,
            last_loss=result.last_loss,
            val_loss=result.val_loss,
        )


def _now() -> str:
    return dt.datetime.now().isoformat()


class _Queued:
    """The MLflow client calls of ``TrackingCallback`` (``set_tag``, ``log_metric``, ``log_artifact``), sent
    through the logger's queue when it has one, so they too survive an outage of the store."""

    def __init__(self, logger: MLFlowLogger) -> None:
        self.logger = logger

    def __getattr__(self, name: str):
        call = getattr(self.logger.experiment, name)
        if not isinstance(self.logger, ResilientMLFlowLogger):
            return call

        def queued(*args: Any, **kwargs: Any) -> None:
            self.logger.submit(name, {"args": [str(a) for a in args]}, lambda: call(*args, **kwargs))

        return queued
