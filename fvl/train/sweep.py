"""Sweeps: a grid of runs declared in YAML, each tagged with the sweep's name, summarised at the end.

```yaml
sweep: fusion                       # the MLflow tag `sweep` of every run
stages: [../pretrain.yaml, ../finetune.yaml]   # run in order per grid point; a later stage starts from
                                    # the previous stage's checkpoint of the same point
overrides: [trainer.max_steps=300]    # applied to every run
eval: {samples: 350}                # optional (EvalConfig keys): score each point's last stage
grid:                               # the cartesian product of the axes
  fusion: [../fusion/dbfusion.yaml, ../fusion/avg_pool.yaml]   # YAML files: merged on top, labelled by stem
  seed: [0, 1]                      # values of the config key named by the axis
```
Each run is tagged ``sweep`` and ``axis_<axis>`` (its label on that axis). A failed run is reported (and the later stages of its grid point skipped); the sweep goes on.
"""

from __future__ import annotations

import itertools
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fvl.config import ConfigError, load
from fvl.eval.config import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class SweepRun:
    name: str
    stage: str
    labels: dict[str, str]
    status: str = "pending"
    result: Any = None
    error: str = ""
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Sweep:
    name: str
    stages: list[Path]
    overrides: list[str]
    axes: dict[str, list[Any]]
    path: Path
    eval: EvalConfig | None = None  # score each grid point's last checkpoint (``fvl eval``'s options)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep must be a mapping")
    unknown = set(raw) - {"sweep", "stages", "overrides", "grid", "eval"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)} (expected sweep, stages, overrides, grid, eval)"
        )
    if not raw.get("sweep") or not raw.get("stages"):
        raise ConfigError(f"{path}: 'sweep' (a name) and 'stages' (experiment YAMLs) are required")
    stages = [(path.parent / s).resolve() for s in raw["stages"]]
    for s in stages:
        if not s.exists():
            raise ConfigError(f"{path}: stage file {s} not found")
    axes = {}
    for axis, values in (raw.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{axis} must be a non-empty list")
        axes[axis] = [
            (path.parent / v).resolve() if isinstance(v, str) and v.endswith((".yaml", ".yml")) else v
            for v in values
        ]
    evaluation = None
    if raw.get("eval"):
        try:
            evaluation = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), raw["eval"]))
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"{path}: eval: {e}") from None
    return Sweep(raw["sweep"], stages, list(raw.get("overrides") or []), axes, path, evaluation)


def grid_points(sweep: Sweep) -> list[tuple[dict[str, str], list[Path], list[str]]]:
    """``(labels, extra YAML layers, overrides)`` per grid point."""
    points = []
    names = list(sweep.axes)
    for combo in itertools.product(*(sweep.axes[a] for a in names)):
        labels, layers, overrides = {}, [], []
        for axis, value in zip(names, combo, strict=True):
            if isinstance(value, Path):
                labels[axis] = value.stem
                layers.append(value)
            else:
                labels[axis] = str(value)
                overrides.append(f"{axis}={value}")
        points.append((labels, layers, overrides))
    return points


def run_sweep(path: str | Path, extra_overrides: list[str] | None = None, train_fn=None) -> list[SweepRun]:
    """Run every grid point's stages; never stops at a failure. Returns one ``SweepRun`` per run."""
    from fvl.train.run import train

    train_fn = train_fn or train
    sweep = load_sweep(path)
    runs: list[SweepRun] = []
    for labels, layers, point_overrides in grid_points(sweep):
        run_name = "-".join([sweep.name, *labels.values()])
        previous = None
        for stage_file in sweep.stages:
            overrides = [
                *sweep.overrides, *point_overrides, *(extra_overrides or []),
                f"name={run_name}", f"tracking.sweep={sweep.name}",
                *(f"tracking.tags.axis_{axis.replace('.', '_')}={label}" for axis, label in labels.items()),
            ]  # fmt: skip
            if previous is not None:
                overrides.append(f"init_from={previous.checkpoint}")
            run = SweepRun(run_name, stage_file.stem, labels)
            runs.append(run)
            try:
                cfg = load(stage_file, overrides, layers=layers)
                run.stage = cfg.stage.name
                run.result = previous = train_fn(cfg)
                if sweep.eval and sweep.eval.samples and stage_file == sweep.stages[-1]:
                    run.scores = evaluate_run(previous.checkpoint, cfg, sweep.eval)
                run.status = "ok"
            except Exception as e:  # reported, and the sweep goes on
                run.status, run.error = "failed", f"{type(e).__name__}: {e}"
                log.error("sweep run %s (%s) failed:\n%s", run_name, stage_file.stem, traceback.format_exc())
                break  # later stages of this point have nothing to start from
    return runs


def evaluate_run(checkpoint: Path, cfg, evaluation: EvalConfig) -> dict[str, float]:
    """Scores of a grid point's checkpoint (logged on its own MLflow run), per kind and overall."""
    from fvl.eval.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, evaluation, tracking=cfg.tracking, progress=False)
    result = report.results[0]
    return {"score": result.aggregate["score"], **{g: v["score"] for g, v in result.groups.items()}}


def print_sweep_summary(name: str, runs: list[SweepRun]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"sweep {name}: {sum(r.status == 'ok' for r in runs)} ok, {sum(r.status == 'failed' for r in runs)} failed"
    )
    for col in (
        "run",
        "stage",
        "status",
        "train loss",
        "val loss",
        "synthetic score",
        "seconds",
        "MLflow run",
    ):
        table.add_column(col)
    for r in runs:
        res = r.result
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"  # noqa: E731
        table.add_row(r.name, r.stage, r.status if r.status == "ok" else f"[red]{r.error[:60]}",
                      fmt(getattr(res, "last_loss", None)), fmt(getattr(res, "val_loss", None)), fmt(r.scores.get("score")),
                      f"{res.seconds:.0f}" if res else "-", getattr(res, "mlflow_run_id", "-"))  # fmt: skip
    Console().print(table)
