"""Where weights come from, decided in this one place for training (``init_from``), evaluation, export, chat
and the lmms-eval adapter.

A spec is one of:
- a file: ``.safetensors`` (the model alone) or a Lightning ``.ckpt`` (its ``.safetensors`` sibling when
  there is one: the same weights without the optimizer), or a sharded ``.ckpt`` folder (an FSDP run's,
  read by ``fvl.models.loading.load_model_weights`` on one process when it has no ``.safetensors``);
- a run folder: its best weights, else its last (``RunDir.model_weights``);
- ``latest``: the newest run under ``output_dir`` (of ``stage`` when given: ``init_from=latest`` looks for
  the stage's ``init_stage``);
- ``mlflow:RUN_ID``: the checkpoint an MLflow run recorded (its ``checkpoint_path`` tag).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fvl.runs.folder import RunDir


@dataclass(frozen=True)
class Weights:
    """Resolved weights: the file, and the MLflow run that wrote them ('' when unknown)."""

    path: Path
    run_id: str = ""

    @property
    def run(self) -> RunDir | None:
        """The run folder the file lies in, if any."""
        return RunDir.of(self.path)


def find_weights(
    spec: str | Path,
    output_dir: str | Path = "runs",
    stage: str = "",
    tracking_uri: str | None = None,
    key: str = "checkpoint",
) -> Weights:
    """The weights ``spec`` names (module docstring). ``key`` names the setting in error messages."""
    spec = str(spec)
    if spec == "latest":
        try:
            run = RunDir.latest(output_dir, stage=stage) if stage else RunDir.latest(output_dir)
        except FileNotFoundError:
            what = f"{stage} run" if stage else "run"
            raise FileNotFoundError(
                f"{key}=latest: no {what} under {output_dir}/ - train one first"
            ) from None
        return Weights(run.model_weights(), run.mlflow_run_id)
    if spec.startswith("mlflow:"):
        from mlflow.tracking import MlflowClient

        run_id = spec.split(":", 1)[1]
        recorded = MlflowClient(tracking_uri).get_run(run_id).data.tags.get("checkpoint_path")
        if not recorded:
            raise FileNotFoundError(f"{key}={spec}: the MLflow run has no checkpoint_path tag")
        return Weights(Path(recorded), run_id)
    path = Path(spec)
    if path.is_dir() and path.suffix == ".ckpt":  # a sharded checkpoint (an FSDP run's): its weights
        path = path.with_suffix(".safetensors") if path.with_suffix(".safetensors").exists() else path
    elif path.is_dir():
        path = RunDir(path).model_weights()
    elif not path.exists():
        raise FileNotFoundError(f"{key}={spec}: no such file or run folder")
    elif path.suffix == ".ckpt" and path.with_suffix(".safetensors").exists():
        path = path.with_suffix(".safetensors")
    run = RunDir.of(path)
    return Weights(path, run.mlflow_run_id if run else "")
