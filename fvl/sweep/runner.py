"""Sweeps: a grid of runs declared in YAML, each tagged with the sweep's name, summarised at the end.

```yaml
sweep: fusion                       # the MLflow tag `sweep` of every run
stages: [../pretrain.yaml, ../finetune.yaml]   # run in order per grid point; a later stage starts from
                                    # the previous stage's checkpoint of the same point
overrides: [trainer.max_steps=300]    # applied to every run
eval: {samples: 350}                # optional (EvalConfig keys): score each point's last stage
feature_cache: true                 # a stage that trains neither the tower nor a learned fusion reads a
                                    # feature cache of every tower feature side by side, built once and shared
                                    # by every point with the same tower (each run fuses its own subset as it
                                    # reads; see fvl.data.feature_cache.build.cache_for_stage)
parallel: 2                         # grid points trained side by side, each in a process of its own
notebook: compare_fusion            # optional: `fvl sweep` ends by executing this notebook (a shipped name
                                    # or a path) on the launch, into outputs/notebooks/<launch id>/
grid:                               # the cartesian product of the axes
  fusion: [../fusion/dbfusion.yaml, ../fusion/avg_pool.yaml]   # YAML files: merged on top, labelled by stem
  seed: [0, 1]                      # values of the config key named by the axis
optional:                           # values added to an axis only when a launch asks (fvl sweep --with-optional)
  fusion: [../fusion/florence2_siglip.yaml]
```
Each run is tagged ``sweep`` and ``axis_<axis>`` (its label on that axis). A failed run is reported (and the later stages of its grid point skipped); the sweep goes on.

With ``parallel: N`` the grid points are shared among N worker processes (each point's stages run in order
in one of them); give each run its share of the cores in ``overrides`` (e.g. ``trainer.cpu_threads=1`` and
``data.num_workers=0`` for two on two cores). The runs' MLflow store must take writers side by side (SQLite
does, with retries; a file store too).

Each launch of a sweep has an id of its own (``<sweep>-<UTC time>-<random hex>``), the tag ``sweep_id`` of
every run of the launch, so that an analysis reads one launch and never mixes it with older ones. A rerun
skips the grid points that finished before with the same config (the launch id aside) and tags their runs
with the new launch's id: they belong to it as much as the runs it trains.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import secrets
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvl.config import ConfigError, dump_yaml, load, parse_yaml, read_yaml, typed
from fvl.config.eval import EvalConfig
from fvl.config.stage import trains_vision
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
    feature_cache: bool = True  # stages with a frozen tower read a shared feature cache (built here)
    parallel: int = 1  # grid points trained side by side, in worker processes
    notebook: Path | None = None  # executed on the launch at the end of ``fvl sweep`` (``report``)


def load_sweep(path: str | Path, with_optional: bool = False) -> Sweep:
    """The sweep of a YAML file; ``with_optional``: its ``optional`` values join their axes."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep must be a mapping")
    known = {
        "sweep",
        "stages",
        "overrides",
        "grid",
        "optional",
        "eval",
        "feature_cache",
        "parallel",
        "notebook",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (expected {', '.join(sorted(known))})")
    if not raw.get("sweep") or not raw.get("stages"):
        raise ConfigError(f"{path}: 'sweep' (a name) and 'stages' (experiment YAMLs) are required")
    stages = [(path.parent / s).resolve() for s in raw["stages"]]
    for s in stages:
        if not s.exists():
            raise ConfigError(f"{path}: stage file {s} not found")
    axes = {
        axis: _axis_values(path, "grid", axis, values) for axis, values in (raw.get("grid") or {}).items()
    }
    for axis, values in (raw.get("optional") or {}).items():
        if axis not in axes:
            raise ConfigError(f"{path}: optional.{axis} extends no axis of the grid ({', '.join(axes)})")
        extra = _axis_values(path, "optional", axis, values)
        if with_optional:
            axes[axis] = axes[axis] + [v for v in extra if v not in axes[axis]]
    evaluation = None
    if raw.get("eval"):
        evaluation = typed(EvalConfig, raw["eval"], source=f"{path}: eval")
    cache = raw.get("feature_cache", True)
    if not isinstance(cache, bool):
        raise ConfigError(f"{path}: feature_cache must be true or false, not {cache!r}")
    parallel = raw.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"{path}: parallel must be a whole number of processes >= 1, not {parallel!r}")
    overrides = list(raw.get("overrides") or [])
    notebook = _notebook_path(path, raw["notebook"]) if raw.get("notebook") else None
    return Sweep(raw["sweep"], stages, overrides, axes, path, evaluation, cache, parallel, notebook)


def _axis_values(path: Path, section: str, axis: str, values: Any) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: {section}.{axis} must be a non-empty list")
    out = [
        (path.parent / v).resolve() if isinstance(v, str) and v.endswith((".yaml", ".yml")) else v
        for v in values
    ]
    missing = [v for v in out if isinstance(v, Path) and not v.exists()]
    if missing:
        raise ConfigError(f"{path}: {section}.{axis}: {missing[0]} not found")
    return out


def _notebook_path(sweep_path: Path, value: Any) -> Path:
    """A sweep's ``notebook``: a path relative to the sweep file, or the name of a shipped notebook."""
    from fvl.util import resources

    value = str(value)
    local = sweep_path.parent / value
    if local.is_file():
        return local.resolve()
    found = resources.find("notebooks", value if value.endswith(".ipynb") else f"{value}.ipynb")
    if found is None:
        known = ", ".join(resources.names("notebooks", suffix=".ipynb"))
        raise ConfigError(f"{sweep_path}: notebook {value!r} not found (shipped notebooks: {known})")
    return found


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


def run_sweep(
    path: str | Path,
    extra_overrides: list[str] | None = None,
    train_fn=None,
    parallel: int | None = None,
    with_optional: bool = False,
) -> list[SweepRun]:
    """Run every grid point's stages; never stops at a failure. Returns one ``SweepRun`` per run, each with
    the launch's ``sweep_id``, in grid order. ``parallel``: worker processes (default: the sweep's own);
    ``with_optional``: the sweep's ``optional`` values join the grid."""
    sweep = load_sweep(path, with_optional)
    sweep_id = new_sweep_id(sweep.name)
    workers = parallel or sweep.parallel
    points = grid_points(sweep)
    log.info(
        "sweep %s: launch %s (MLflow tag %s), %d points, %d side by side",
        sweep.name, sweep_id, SWEEP_ID_TAG, len(points), min(workers, len(points)),
    )  # fmt: skip
    if workers <= 1 or len(points) <= 1 or train_fn is not None:
        return [
            r for i in range(len(points)) for r in run_point(sweep, i, sweep_id, extra_overrides, train_fn)
        ]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    prepare_store(sweep, extra_overrides)
    if sweep.feature_cache:
        prebuild_caches(sweep, extra_overrides)
    # spawn, not fork: a worker must not inherit the parent's torch threads, open files or MLflow client
    n = min(workers, len(points))
    threads = max(1, (os.cpu_count() or 1) // n)  # what a worker's evaluation uses (training: cpu_threads)
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(n, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(run_point, sweep, i, sweep_id, extra_overrides) for i in range(len(points))]
        return [r for i, f in enumerate(futures) for r in _point_result(f, sweep, points, i, sweep_id)]


def prepare_store(sweep: Sweep, extra_overrides: list[str] | None = None) -> None:
    """Create the runs' MLflow store and experiment before the workers start: two processes creating a new
    SQLite store at once race on its schema migration (measured: one of them fails)."""
    from mlflow.tracking import MlflowClient

    from fvl.runs.tracking import experiment_id, tracking_uri

    cfg = first_point_config(sweep, sweep.stages[0], extra_overrides)
    uri = tracking_uri(cfg.tracking)
    experiment_id(MlflowClient(uri), cfg.tracking.experiment, uri)


def prebuild_caches(sweep: Sweep, extra_overrides: list[str] | None = None) -> None:
    """Build the shared feature caches before the workers start, with all the cores: each stage's, as its
    first grid point would build it, while no earlier stage trains the tower (the tower is then the same in
    every stage). Workers side by side would otherwise build each cache in one of them while the others wait
    on its lock. A cache that turns out not to match a run is simply not used (the run builds its own)."""
    for stage_file in sweep.stages:
        try:
            cfg = first_point_config(sweep, stage_file, extra_overrides)
            cfg.data.num_workers = max(1, cfg.data.num_workers)  # a core decodes while another runs the tower
            with_feature_cache(cfg, None)
        except Exception as e:  # noqa: BLE001 - only an optimisation: the runs build what they need
            log.warning("sweep %s: no shared cache prebuilt for %s: %s: %s", sweep.name, stage_file.stem,
                        type(e).__name__, e)  # fmt: skip
            return
        if trains_vision(cfg.stage.trainable):
            return  # later stages start from a tower this stage changes


def first_point_config(sweep: Sweep, stage_file: Path, extra_overrides: list[str] | None = None):
    """The config of the first grid point's stage ``stage_file``, as far as the launch's set-up needs it (its
    store and tower; the run's own name and tags are added when the point runs)."""
    _labels, layers, point_overrides = grid_points(sweep)[0]
    return load(stage_file, [*sweep.overrides, *point_overrides, *(extra_overrides or [])], layers=layers)


def run_name(sweep: Sweep, labels: dict[str, str]) -> str:
    """A grid point's run name: the sweep's name and its labels (``fusion-dbfusion-0``)."""
    return "-".join([sweep.name, *labels.values()])


def report(
    sweep: Sweep,
    sweep_id: str,
    extra_overrides: list[str] | None = None,
    out_root: str | Path = "outputs/notebooks",
) -> Path:
    """Execute the sweep's notebook on launch ``sweep_id`` (``FVL_SWEEP``, ``FVL_SWEEP_ID`` and the runs'
    store as ``FVL_TRACKING_URI``); returns the executed copy, ``<out_root>/<sweep_id>/<notebook>``. A failing
    cell raises (the runs stay as they are: ``fvl notebooks`` can redo the report)."""
    from fvl.eval.notebooks import execute
    from fvl.runs.tracking import tracking_uri

    if sweep.notebook is None:
        raise ValueError(f"sweep {sweep.name} names no notebook")
    uri = tracking_uri(first_point_config(sweep, sweep.stages[0], extra_overrides).tracking)
    env = {"FVL_SWEEP": sweep.name, "FVL_SWEEP_ID": sweep_id, "FVL_TRACKING_URI": uri}
    return execute(sweep.notebook, Path(out_root) / sweep_id, env=env)


def _point_result(future, sweep: Sweep, points, index: int, sweep_id: str) -> list[SweepRun]:
    """A worker's runs; a worker that died (killed, out of memory) fails its point's runs, not the sweep."""
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - reported per run
        labels = points[index][0]
        name = run_name(sweep, labels)
        log.error("sweep point %s: its worker failed: %s: %s", name, type(e).__name__, e)
        return [
            SweepRun(name, stage.stem, labels, "failed", error=f"worker: {type(e).__name__}: {e}",
                     sweep_id=sweep_id)
            for stage in sweep.stages
        ]  # fmt: skip


def run_point(
    sweep: Sweep, index: int, sweep_id: str, extra_overrides: list[str] | None = None, train_fn=None
) -> list[SweepRun]:
    """Grid point ``index``'s stages in order (each from the previous one's checkpoint), then its
    evaluation; a failed stage ends the point. Runs in the sweep's process or in a worker."""
    from fvl.train.run import train

    train_fn = train_fn or train
    labels, layers, point_overrides = grid_points(sweep)[index]
    name = run_name(sweep, labels)
    runs: list[SweepRun] = []
    previous = None
    for stage_file in sweep.stages:
        overrides = [
            *sweep.overrides, *point_overrides, *(extra_overrides or []),
            f"name={name}", f"tracking.sweep={sweep.name}", f"tracking.tags.{SWEEP_ID_TAG}={sweep_id}",
            *(f"tracking.tags.axis_{axis.replace('.', '_')}={label}" for axis, label in labels.items()),
        ]  # fmt: skip
        if previous is not None:
            overrides.append(f"init_from={previous.checkpoint}")
        run = SweepRun(name, stage_file.stem, labels, sweep_id=sweep_id)
        runs.append(run)
        try:
            cfg = load(stage_file, overrides, layers=layers)
            run.stage = cfg.stage.name
            done = finished_run(cfg)
            if done is not None:  # a rerun of the sweep: this point's stage finished before
                run.result = previous = done
                run.status = "done before"
                tag_launch(cfg, done.mlflow_run_id, sweep_id)
                log.info("sweep run %s (%s) finished before, in %s: skipped", name, run.stage, done.run_dir)
                continue
            if sweep.feature_cache:
                cfg = with_feature_cache(cfg, previous.checkpoint if previous is not None else None)
            run.result = previous = train_fn(cfg)
            run.status = "ok"
        except Exception as e:  # reported, and the sweep goes on
            run.status, run.error = "failed", f"{type(e).__name__}: {e}"
            log.error("sweep run %s (%s) failed:\n%s", name, stage_file.stem, traceback.format_exc())
            break  # later stages of this point have nothing to start from
        if sweep.eval and sweep.eval.samples and stage_file == sweep.stages[-1]:
            try:  # a failed evaluation leaves the trained run as it is: ok, with the error noted
                run.scores = evaluate_run(previous.checkpoint, cfg, sweep.eval)
            except Exception as e:
                run.error = f"evaluation failed: {type(e).__name__}: {e}"
                log.error("sweep run %s: evaluation failed:\n%s", name, traceback.format_exc())
    return runs


def _worker_init(threads: int) -> None:
    """A worker's share of the cores, for everything its runs do outside training (building a cache,
    evaluating): the workers side by side must not each take all the cores."""
    import torch

    torch.set_num_threads(threads)
    _worker_logging()


def _worker_logging() -> None:
    """A spawned worker starts without the CLI's logging set-up: give fvl's messages a handler."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def tag_launch(cfg, run_id: str, sweep_id: str) -> None:
    """Tag the MLflow run ``run_id`` (of ``cfg``'s tracking store) as a run of launch ``sweep_id``. A store
    that does not answer is logged, not fatal: the run's checkpoint is still reused."""
    from mlflow.tracking import MlflowClient

    from fvl.runs.tracking import tracking_uri

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
    conf = parse_yaml(text)
    (conf.get("tracking") or {}).get("tags", {}).pop(SWEEP_ID_TAG, None)
    return dump_yaml(conf)


def finished_run(cfg) -> RunResult | None:
    """The finished run of ``cfg``'s name and stage whose resolved config is ``cfg``'s, the launch id aside
    (a rerun of a sweep skips it), as its ``RunResult``; None when there is none."""
    from fvl.config import to_yaml
    from fvl.runs.folder import RunDir

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


def with_feature_cache(cfg, checkpoint: Path | None):
    """``cfg`` reading a feature cache of ``checkpoint`` (None: of the first stage's model, as ``cfg`` builds
    it) when its stage can (``fvl.data.feature_cache.build.cache_for_stage``). The cache holds every feature of the tower
    side by side, so all the sweep's runs with this tower share it; caches live in
    ``<output_dir>/feature_cache/``."""
    from fvl.data.feature_cache.build import cache_for_stage

    cache = cache_for_stage(cfg, checkpoint, Path(cfg.output_dir) / "feature_cache", shared=True)
    if cache is not None:
        cfg.data.feature_cache = str(cache)
        log.info("stage %s reads the feature cache %s", cfg.stage.name, cache)
    return cfg


def evaluate_run(checkpoint: Path, cfg, evaluation: EvalConfig) -> dict[str, float]:
    """Scores of a grid point's checkpoint (logged on its own MLflow run), per kind and overall."""
    from fvl.eval.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, evaluation, tracking=cfg.tracking, progress=False)
    if report.failures:
        raise RuntimeError(f"evaluation of {checkpoint} failed: {report.failures}")
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
