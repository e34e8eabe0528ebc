"""Typed schema of ``tracking:``: where a run's MLflow records go (``fvl.runs.tracking`` acts on it)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_EXPERIMENT = "fvl"


@dataclass
class TrackingConfig:
    """MLflow tracking.

    uri: tracking store; empty means ``$MLFLOW_TRACKING_URI`` or else the embedded SQLite store
      ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/`` (no server needed).
    experiment: MLflow experiment name (training, evaluation and analysis runs all go there).
    run_name: MLflow run name (default: ``{name}-{stage}``).
    sweep: sweep name (set by ``fvl sweep``; logged as a tag).
    tags: extra tags.
    retry_seconds: while the store does not answer mid-run, training goes on and tracking writes are kept;
      they are retried at most this often.
    final_wait_seconds: at the end of a run, how long to keep retrying; what still cannot be written is saved
      to ``unsent_tracking.jsonl`` in the run folder.
    """

    uri: str = ""
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str = ""
    sweep: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    retry_seconds: float = 30.0
    final_wait_seconds: float = 60.0
