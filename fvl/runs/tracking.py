"""MLflow: where runs go (``tracking:`` in an experiment YAML) and the few calls every part of fvl shares.

The embedded SQLite store ``mlruns/mlflow.db`` (artifacts under ``mlruns/``, no server) is the default;
``$MLFLOW_TRACKING_URI`` or ``tracking.uri`` points at a team server. Training runs are logged by
``fvl.train.tracking.TrackingCallback``; evaluation and analyses log through ``analysis_run`` here. Every
place creates runs in ``tracking.experiment``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from fvl.config.tracking import TrackingConfig

DEFAULT_DIR = "mlruns"


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store ``mlruns/mlflow.db``."""
    if cfg is not None and cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(DEFAULT_DIR).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """A SQLite store keeps its artifacts beside the database file (``mlruns/`` for the default store)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve().parent.as_uri()
    return None


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (with its artifacts beside a SQLite store) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def git_commit() -> str:
    """The commit of the code that ran, with ``-dirty`` when the work tree had changes (``unknown`` for an
    installed package outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def analysis_run(
    kind: str, files: Iterable[Path], tags: dict[str, str], tracking: TrackingConfig | None = None
) -> str:
    """A finished MLflow run tagged ``analysis=<kind>`` holding ``files`` as artifacts; returns its id."""
    from mlflow.tracking import MlflowClient

    cfg = tracking or TrackingConfig()
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run_id = client.create_run(
        experiment_id(client, cfg.experiment, uri),
        tags={"analysis": kind, "mlflow.runName": kind, "git_commit": git_commit(), **tags},
    ).info.run_id
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path=kind)
    client.set_terminated(run_id)
    return run_id
