"""The run folder, and the one class that knows its layout. Every reader and writer goes through ``RunDir``.

```
runs/<name>-<stage>-<time>/
  config.yaml               the resolved experiment config
  run.json                  name, stage, MLflow run id, start / end, losses, checkpoint chosen
  checkpoints/
    last.ckpt  last.safetensors     Lightning's full state (resume) + the model alone (finetune, eval, export)
    best.ckpt  best.safetensors     the same at the best validation loss
  eval/                     fvl eval's JSON results
```
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvl.util.files import write_text_atomic

CONFIG = "config.yaml"
INFO = "run.json"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
KINDS = ("best", "last")
RUN_DIR_ENV = "FVL_RUN_DIR"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 as the launcher's environment says (torchrun's ``RANK``,
    Lightning's ``NODE_RANK`` + ``LOCAL_RANK``, SLURM's ``SLURM_PROCID``); a plain process is."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    if "LOCAL_RANK" in os.environ or "NODE_RANK" in os.environ:
        return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    return int(os.environ.get("SLURM_PROCID", 0)) == 0


@dataclass(frozen=True)
class RunDir:
    """One run folder (see the module docstring)."""

    path: Path

    # ---- finding runs --------------------------------------------------------------------------------------
    @classmethod
    def create(cls, output_dir: str | Path, name: str, stage: str) -> RunDir:
        """A new folder ``<output_dir>/<name>-<stage>-<time>`` whose ``run.json`` records the three.

        Only global rank 0 creates it. A process started by a launcher inside a run (Lightning's DDP / FSDP
        ranks inherit ``$FVL_RUN_DIR``, see ``shared``) joins that run's folder instead."""
        joined = os.environ.get(RUN_DIR_ENV)
        if joined:
            return cls(Path(joined))
        started = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        run = cls(Path(output_dir) / f"{name}-{stage}-{started}")
        if is_rank_zero():
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_info({"name": name, "stage": stage, "started": started})
        return run

    @contextmanager
    def shared(self) -> Iterator[RunDir]:
        """Export this folder as ``$FVL_RUN_DIR`` while the run lasts, so that the ranks a launcher starts
        from this process create no folders of their own."""
        previous = os.environ.get(RUN_DIR_ENV)
        os.environ[RUN_DIR_ENV] = str(self.path)
        try:
            yield self
        finally:
            if previous is None:
                os.environ.pop(RUN_DIR_ENV, None)
            else:
                os.environ[RUN_DIR_ENV] = previous

    @classmethod
    def of(cls, path: str | Path) -> RunDir | None:
        """The run a file belongs to (a checkpoint, an eval result) or the run folder itself; None when
        ``path`` lies in no run folder."""
        path = Path(path)
        for candidate in (path, *path.parents[:2]):
            if (candidate / INFO).is_file() or (candidate / CONFIG).is_file():
                return cls(candidate)
        return None

    @classmethod
    def find(cls, output_dir: str | Path, stage: str | None = None, name: str | None = None) -> list[RunDir]:
        """Runs under ``output_dir`` (newest first), filtered by stage and experiment name."""
        runs = []
        for info_path in Path(output_dir).glob(f"*/{INFO}"):
            run = cls(info_path.parent)
            info = run.info
            if (stage is None or info.get("stage") == stage) and (name is None or info.get("name") == name):
                runs.append(run)
        return sorted(runs, key=lambda r: r.info.get("started", ""), reverse=True)

    @classmethod
    def latest(cls, output_dir: str | Path, stage: str | None = None, name: str | None = None) -> RunDir:
        runs = cls.find(output_dir, stage, name)
        if not runs:
            what = " ".join(
                filter(None, [f"stage {stage!r}" if stage else "", f"name {name!r}" if name else ""])
            )
            raise FileNotFoundError(
                f"no run{' of ' + what if what else ''} under {output_dir}/: train one first"
            )
        return runs[0]

    # ---- what a run holds ----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def write_config(self, yaml_text: str) -> None:
        write_text_atomic(self.config_path, yaml_text)

    def config(self):
        """The run's config (``fvl.config.ExperimentConfig``), read from the ``config.yaml`` it wrote."""
        from fvl.config import from_yaml

        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.path}: no {CONFIG}")
        return from_yaml(self.config_path.read_text(), str(self.config_path))

    @property
    def info(self) -> dict[str, Any]:
        path = self.path / INFO
        return json.loads(path.read_text()) if path.exists() else {}

    def write_info(self, info: dict[str, Any]) -> None:
        write_text_atomic(self.path / INFO, json.dumps(info, indent=1, sort_keys=True))

    def update_info(self, **values: Any) -> dict[str, Any]:
        info = {**self.info, **values}
        self.write_info(info)
        return info

    @property
    def mlflow_run_id(self) -> str:
        return self.info.get("mlflow_run_id", "")

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def ckpt(self, kind: str) -> Path:
        """Lightning's full state of ``kind`` (``best`` | ``last``): what ``resume`` reads."""
        return self.checkpoints / f"{_kind(kind)}.ckpt"

    def weights(self, kind: str) -> Path:
        """The model alone as safetensors of ``kind`` (``best`` | ``last``)."""
        return self.checkpoints / f"{_kind(kind)}.safetensors"

    def model_weights(self) -> Path:
        """The run's best model weights, else its last (safetensors; a sharded run's full ``.ckpt``)."""
        for path in (self.weights("best"), self.weights("last"), self.ckpt("best"), self.ckpt("last")):
            if path.exists():
                return path
        raise FileNotFoundError(f"{self.path}: no best/last checkpoint (did the run finish a step?)")

    @property
    def eval_dir(self) -> Path:
        folder = self.path / EVAL
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r}: expected one of {KINDS}")
    return kind
