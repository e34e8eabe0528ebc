"""Sweeps: a grid of runs declared in YAML, each tagged with the sweep's name, summarised at the end.

```yaml
sweep: fusion                       # the MLflow tag `sweep` of every run
stages: [../pretrain.yaml, ../finetune.yaml]   # run in order per grid point; a later stage starts from
                                    # the previous stage's checkpoint of the same point
overrides: [trainer.max_steps=300]    # applied to every run
eval: {samples: 350}                # optional (EvalConfig keys): score each point's last stage
feature_cache: true                 # a later stage that trains neither tower nor fusion reads a feature
                                    # cache built from the previous stage's checkpoint (when it reads at least
                                    # one pass over its samples; see fvl.features.cache_for_stage)
grid:                               # the cartesian product of the axes
  fusion: [../fusion/dbfusion.yaml, ../fusion/avg_pool.yaml]   # YAML files: merged on top, labelled by stem
  seed: [0, 1]                      # values of the config key named by the axis
```
Each run is tagged ``sweep`` and ``axis_<axis>`` (its label on that axis). A failed run is reported (and the later stages of its grid point skipped); the sweep goes on.

Each launch of a sweep has an id of its own (``<sweep>-<UTC time>-<random hex>``), the tag ``sweep_id`` of
every run of the launch, so that an analysis reads one launch and never mixes it with older ones. A rerun
skips the grid points that finished before with the same config (the launch id aside) and tags their runs
with the new launch's id: they belong to it as much as the runs it trains.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import secrets
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fvl.config import ConfigError, load
from fvl.eval.config import EvalConfig
from fvl.train.run import RunResult

log = logging.getLogger(__name__)

SWEEP_ID_TAG = "sweep_id"  # the MLflow tag (a key of ``tracking.tags``) naming a run's sweep launch


@dataclass
class SweepRun:
    name: str
    stage: str
    labels: dict[str, str]
    status: str = "pending"
    result: Any = None
    error: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    sweep_id: str = ""  # the launch this run belongs to (its MLflow tag ``sweep_id``)


@dataclass
class Sweep:
    name: str
    stages: list[Path]
    overrides: list[str]
    axes: dict[str, list[Any]]
    path: Path
    eval: EvalConfig | None = None  # score each grid point's last checkpoint (``fvl eval``'s options)
    feature_cache: bool = True  # later stages with a frozen tower read a feature cache (built here)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep must be a mapping")
    unknown = set(raw) - {"sweep", "stages", "overrides", "grid", "eval", "feature_cache"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)} (expected sweep, stages, overrides, grid, eval, "
            "feature_cache)"
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
    cache = raw.get("feature_cache", True)
    if not isinstance(cache, bool):
        raise ConfigError(f"{path}: feature_cache must be true or false, not {cache!r}")
    overrides = list(raw.get("overrides") or [])
    return Sweep(raw["sweep"], stages, overrides, axes, path, evaluation, cache)


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


def new_sweep_id(name: str) -> str:
    """A launch id: the sweep's name, the UTC time and random hex (two launches in one second differ)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


def run_sweep(path: str | Path, extra_overrides: list[str] | None = None, train_fn=None) -> list[SweepRun]:
    """Run every grid point's stages; never stops at a failure. Returns one ``SweepRun`` per run, each with
    the launch's ``sweep_id``."""
    from fvl.train.run import train

    train_fn = train_fn or train
    sweep = load_sweep(path)
    sweep_id = new_sweep_id(sweep.name)
    log.info("sweep %s: launch %s (MLflow tag %s)", sweep.name, sweep_id, SWEEP_ID_TAG)
    runs: list[SweepRun] = []
    for labels, layers, point_overrides in grid_points(sweep):
        run_name = "-".join([sweep.name, *labels.values()])
        previous = None
        for stage_file in sweep.stages:
            overrides = [
                *sweep.overrides, *point_overrides, *(extra_overrides or []),
                f"name={run_name}", f"tracking.sweep={sweep.name}", f"tracking.tags.{SWEEP_ID_TAG}={sweep_id}",
                *(f"tracking.tags.axis_{axis.replace('.', '_')}={label}" for axis, label in labels.items()),
            ]  # fmt: skip
            if previous is not None:
                overrides.append(f"init_from={previous.checkpoint}")
            run = SweepRun(run_name, stage_file.stem, labels, sweep_id=sweep_id)
            runs.append(run)
            try:
                cfg = load(stage_file, overrides, layers=layers)
                if previous is not None and sweep.feature_cache:
                    cfg = with_feature_cache(cfg, previous.checkpoint)
                run.stage = cfg.stage.name
                done = finished_run(cfg)
                if done is not None:  # a rerun of the sweep: this point's stage finished before
                    run.result = previous = done
                    run.status = "done before"
                    tag_launch(cfg, done.mlflow_run_id, sweep_id)
                    log.info(
                        "sweep run %s (%s) finished before, in %s: skipped", run_name, run.stage, done.run_dir
                    )
                    continue
                run.result = previous = train_fn(cfg)
                run.status = "ok"
            except Exception as e:  # reported, and the sweep goes on
                run.status, run.error = "failed", f"{type(e).__name__}: {e}"
                log.error("sweep run %s (%s) failed:\n%s", run_name, stage_file.stem, traceback.format_exc())
                break  # later stages of this point have nothing to start from
            if sweep.eval and sweep.eval.samples and stage_file == sweep.stages[-1]:
                try:  # a failed evaluation leaves the trained run as it is: ok, with the error noted
                    run.scores = evaluate_run(previous.checkpoint, cfg, sweep.eval)
                except Exception as e:
                    run.error = f"evaluation failed: {type(e).__name__}: {e}"
                    log.error("sweep run %s: evaluation failed:\n%s", run_name, traceback.format_exc())
    return runs


def tag_launch(cfg, run_id: str, sweep_id: str) -> None:
    """Tag the MLflow run ``run_id`` (of ``cfg``'s tracking store) as a run of launch ``sweep_id``. A store
    that does not answer is logged, not fatal: the run's checkpoint is still reused."""
    from mlflow.tracking import MlflowClient

    from fvl.tracking import tracking_uri

    if not run_id:
        log.warning(
            "sweep run %s (%s): no MLflow run to tag with launch %s", cfg.name, cfg.stage.name, sweep_id
        )
        return
    try:
        MlflowClient(tracking_uri(cfg.tracking)).set_tag(run_id, SWEEP_ID_TAG, sweep_id)
    except Exception as e:  # noqa: BLE001 - tracking must not stop the sweep
        log.warning("MLflow run %s not tagged with launch %s: %s: %s", run_id, sweep_id, type(e).__name__, e)


def comparable_config(text: str) -> str:
    """A resolved config's YAML without the launch id: two launches of one sweep train the same runs."""
    conf = OmegaConf.create(text)
    tags = OmegaConf.select(conf, "tracking.tags")
    if tags is not None and SWEEP_ID_TAG in tags:
        del tags[SWEEP_ID_TAG]
    return OmegaConf.to_yaml(conf)


def finished_run(cfg) -> RunResult | None:
    """The finished run of ``cfg``'s name and stage whose resolved config is ``cfg``'s, the launch id aside
    (a rerun of a sweep skips it), as its ``RunResult``; None when there is none."""
    from fvl.config import to_yaml
    from fvl.runs import RunDir

    wanted = comparable_config(to_yaml(cfg))
    for found in RunDir.find(cfg.output_dir, stage=cfg.stage.name, name=cfg.name):
        info = found.info
        checkpoint = Path(info.get("checkpoint", ""))
        if not info.get("finished") or not checkpoint.is_file() or not found.config_path.is_file():
            continue
        if comparable_config(found.config_path.read_text()) != wanted:
            continue
        return RunResult(
            run_dir=found.path,
            mlflow_run_id=info.get("mlflow_run_id", ""),
            checkpoint=checkpoint,
            best_checkpoint=None,
            steps=int(info.get("steps", 0)),
            seconds=0.0,
            first_loss=info.get("first_loss"),
            last_loss=info.get("last_loss"),
            val_loss=info.get("val_loss"),
            info=info,
        )
    return None


def with_feature_cache(cfg, checkpoint: Path):
    """``cfg`` reading a feature cache of ``checkpoint`` when its stage can (``fvl.features.cache_for_stage``;
    caches live in ``<output_dir>/feature_cache/``)."""
    from fvl.features import cache_for_stage

    cache = cache_for_stage(cfg, checkpoint, Path(cfg.output_dir) / "feature_cache")
    if cache is not None:
        cfg.data.feature_cache = str(cache)
        log.info("stage %s reads the feature cache %s", cfg.stage.name, cache)
    return cfg


def evaluate_run(checkpoint: Path, cfg, evaluation: EvalConfig) -> dict[str, float]:
    """Scores of a grid point's checkpoint (logged on its own MLflow run), per kind and overall."""
    from fvl.eval.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, evaluation, tracking=cfg.tracking, progress=False)
    result = report.results[0]
    return {"score": result.aggregate["score"], **{g: v["score"] for g, v in result.groups.items()}}


def print_sweep_summary(name: str, runs: list[SweepRun]) -> None:
    from rich.console import Console
    from rich.table import Table

    launch = next((r.sweep_id for r in runs if r.sweep_id), "")
    counts = ", ".join(f"{sum(r.status == s for r in runs)} {s}" for s in ("ok", "done before", "failed"))
    title = f"sweep {name}" + (f" (launch {launch})" if launch else "") + f": {counts}"
    note = f"MLflow tag {SWEEP_ID_TAG}={launch} (FVL_SWEEP_ID of the comparison notebook)"
    table = Table(title=title, caption=note if launch else None)
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
        status = f"[red]{r.error[:60]}" if r.status == "failed" else r.status
        if r.status != "failed" and r.error:  # trained, but its evaluation failed
            status = f"{r.status} [yellow]({r.error[:50]})"
        table.add_row(r.name, r.stage, status,
                      fmt(getattr(res, "last_loss", None)), fmt(getattr(res, "val_loss", None)), fmt(r.scores.get("score")),
                      f"{res.seconds:.0f}" if res else "-", getattr(res, "mlflow_run_id", "-"))  # fmt: skip
    Console().print(table)
