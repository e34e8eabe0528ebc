"""MLflow tracking of a run: the embedded SQLite store by default (``mlruns/mlflow.db``, artifacts under
``mlruns/``), ``$MLFLOW_TRACKING_URI`` or ``tracking.uri`` for a team server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from fvl.config import REPO_ROOT

DEFAULT_DIR = "mlruns"


def tracking_uri(cfg: DictConfig | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store ``mlruns/mlflow.db``."""
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(DEFAULT_DIR).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def git_commit() -> str:
    """The commit of the code that ran, with ``-dirty`` when the work tree had changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(cfg: DictConfig) -> dict[str, str]:
    m = cfg.model
    tags = {
        "stage": cfg.stage,
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


def make_logger(cfg: DictConfig, run_id: str | None = None) -> MLFlowLogger:
    uri = tracking_uri(cfg)
    # A SQLite store keeps its artifacts beside the database file (mlruns/ for the default store).
    artifacts = (
        Path(uri[len("sqlite:///") :]).resolve().parent.as_uri() if uri.startswith("sqlite:///") else None
    )
    return MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or f"{cfg.name}-{cfg.stage}",
        tracking_uri=uri,
        tags=run_tags(cfg) if run_id is None else None,
        artifact_location=artifacts,
        run_id=run_id,
    )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def log_setup(
    logger: MLFlowLogger, cfg: DictConfig, run_dir: Path, counts: dict[str, dict[str, int]]
) -> None:
    """Params (the flattened resolved config and the trainable counts) and the YAML as an artifact."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    for component, c in counts.items():
        for kind, n in c.items():
            params[f"params.{component}.{kind}"] = n
    logger.log_hyperparams(params)
    config_path = run_dir / "config.yaml"
    logger.experiment.log_artifact(logger.run_id, str(config_path))
