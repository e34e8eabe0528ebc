"""``fvl eval``: batched greedy generation (KV cache) over benchmarks, scored with ``fvl.eval.metrics``,
written as JSON (per sample and aggregate) and logged as MLflow metrics on the checkpoint's run.
``evaluate_checkpoint`` is the one entry point for a checkpoint (the CLI and sweeps call it)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fvl.eval.benchmarks import Benchmark, resolve_benchmark
from fvl.eval.config import EvalConfig
from fvl.eval.metrics import ANLS, MultipleChoiceAccuracy, POPEMetrics, RelaxedAccuracy, VQAAccuracy
from fvl.models.loading import load_for_inference
from fvl.runs import RunDir, resolve_weights
from fvl.tracking import TrackingConfig, experiment_id, tracking_uri

log = logging.getLogger(__name__)

METRICS = {
    "vqa": VQAAccuracy,  # VQAv2's convention (references normalised only when annotators disagree)
    "vqa_textvqa": lambda: VQAAccuracy(mode="textvqa"),  # TextVQA's: every reference normalised
    "anls": ANLS,
    "relaxed": RelaxedAccuracy,
    "pope": POPEMetrics,
    "mc": MultipleChoiceAccuracy,
}


def normalize_short(text: str) -> str:
    """Synthetic answers are single words: compare lower-cased, stripped, without a trailing period."""
    return text.strip().lower().rstrip(".").strip()


class _Scorer:
    """One metric over all samples plus one per group, and per-sample scores."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.overall = self._new()
        self.groups: dict[str, Any] = defaultdict(self._new)

    def _new(self):
        return None if self.kind == "exact" else METRICS[self.kind]()

    def _update(self, metric, preds, refs, options) -> None:
        if self.kind == "mc":
            metric.update(preds, refs, options=options)
        else:
            metric.update(preds, refs)

    def score(self, pred: str, refs: list[str], options: list[str] | None) -> float:
        if self.kind == "exact":
            return float(normalize_short(pred) in {normalize_short(r) for r in refs})
        metric = self._new()
        self._update(metric, [pred], [refs], [options] if options is not None else None)
        value = metric.compute()
        return float(value["accuracy"] if isinstance(value, dict) else value)

    def add(self, group: str, pred: str, refs: list[str], options: list[str] | None) -> None:
        if self.kind == "exact":
            return
        opts = [options] if options is not None else None
        self._update(self.overall, [pred], [refs], opts)
        self._update(self.groups[group], [pred], [refs], opts)

    @staticmethod
    def _values(metric) -> dict[str, float]:
        value = metric.compute()
        return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else {"score": float(value)}


@dataclass
class EvalResult:
    benchmark: str
    metric: str
    aggregate: dict[str, float]
    groups: dict[str, dict[str, float]]
    chance: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "metric": self.metric, "aggregate": self.aggregate, "groups": self.groups,
                "chance": self.chance, "samples": self.records}  # fmt: skip


@torch.no_grad()
def evaluate(
    model, bench: Benchmark, batch_size: int = 32, max_new_tokens: int = 16, progress: bool = True
) -> EvalResult:
    """Greedy answers for every sample of ``bench`` and their scores."""
    from rich.progress import Progress

    model.eval()
    scorer = _Scorer(bench.metric)
    records = []
    by_group: dict[str, list[float]] = defaultdict(list)
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"eval {bench.name}", total=len(bench.samples))
        for start in range(0, len(bench.samples), batch_size):
            chunk = bench.samples[start : start + batch_size]
            preds = model.generate(
                [s.images for s in chunk], [s.prompt for s in chunk], max_new_tokens=max_new_tokens
            )
            for s, pred in zip(chunk, preds, strict=True):
                score = scorer.score(pred, s.references, s.options)
                scorer.add(s.group, pred, s.references, s.options)
                by_group[s.group].append(score)
                records.append(
                    {
                        "id": s.id,
                        "group": s.group,
                        "prompt": s.prompt,
                        "prediction": pred,
                        "references": s.references,
                        "score": score,
                    }
                )
            bar.advance(task, len(chunk))
    if bench.metric == "exact":
        scores = [r["score"] for r in records]
        aggregate = {"score": sum(scores) / max(1, len(scores))}
        groups = {g: {"score": sum(v) / len(v)} for g, v in sorted(by_group.items())}
    else:
        aggregate = _Scorer._values(scorer.overall)
        groups = {g: _Scorer._values(m) for g, m in sorted(scorer.groups.items())}
    return EvalResult(bench.name, bench.metric, aggregate, groups, dict(bench.chance), records)


@dataclass
class EvalReport:
    """What ``evaluate_checkpoint`` did: the checkpoint scored, results per benchmark, their JSON files and
    the MLflow run they were logged on."""

    checkpoint: Path
    results: list[EvalResult]
    paths: list[Path]
    mlflow_run_id: str


def evaluate_checkpoint(
    spec: str | Path,
    cfg: EvalConfig | None = None,
    output_dir: str | Path = "runs",
    out: str | Path | None = None,
    tracking: TrackingConfig | None = None,
    progress: bool = True,
) -> EvalReport:
    """Score a checkpoint (a weights file, a run folder or ``latest``) on ``cfg.bench``: JSON per benchmark in
    ``out`` (default: the run's ``eval/``) and metrics ``eval/<bench>/*`` on the checkpoint's own MLflow run.
    The one evaluation path: ``fvl eval`` and sweeps both call it."""
    cfg = cfg or EvalConfig()
    checkpoint = resolve_weights(spec, output_dir)
    model = load_for_inference(checkpoint)
    run = RunDir.of(checkpoint)
    folder = Path(out) if out else run.eval_dir if run else checkpoint.parent / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    results, paths = [], []
    for bench_spec in cfg.bench:
        bench = resolve_benchmark(bench_spec, cfg.samples)
        result = evaluate(model, bench, cfg.batch_size, cfg.max_new_tokens, progress=progress)
        path = folder / f"{bench.name}.json"
        path.write_text(json.dumps(result.to_json(), indent=1))
        results.append(result)
        paths.append(path)
    return EvalReport(checkpoint, results, paths, log_to_mlflow(results, checkpoint, paths, tracking))


def log_to_mlflow(
    results: list[EvalResult],
    checkpoint: Path,
    json_paths: list[Path],
    tracking: TrackingConfig | None = None,
) -> str:
    """Metrics ``eval/<bench>/<name>`` (and per group) on the checkpoint's own run when the store has it,
    else on a new run tagged ``eval_of`` in the tracking experiment (given, else the checkpoint's run's,
    else the default); the JSON files as artifacts. Returns the run id."""
    from mlflow.tracking import MlflowClient

    run = RunDir.of(checkpoint)
    if tracking is None:
        tracking = TrackingConfig()
        if run is not None and run.config_path.exists():
            tracking.experiment = run.config().get("tracking", {}).get("experiment", tracking.experiment)
    uri = tracking_uri(tracking)
    client = MlflowClient(uri)
    run_id = run.mlflow_run_id if run else ""
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:  # the run lives in another store: link instead
            run_id = ""
    if not run_id:
        run_id = client.create_run(
            experiment_id(client, tracking.experiment, uri),
            tags={"eval_of": str(checkpoint), "mlflow.runName": f"eval-{checkpoint.stem}"},
        ).info.run_id
        client.set_terminated(run_id)
    for r in results:
        for name, value in r.aggregate.items():
            client.log_metric(run_id, f"eval/{r.benchmark}/{name}", value)
        for group, values in r.groups.items():
            for name, value in values.items():
                key = (
                    f"eval/{r.benchmark}/{group}" if name == "score" else f"eval/{r.benchmark}/{group}/{name}"
                )
                client.log_metric(run_id, key, value)
    for p in json_paths:
        client.log_artifact(run_id, str(p), artifact_path="eval")
    return run_id


def print_results(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result.benchmark} ({result.metric}): "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.aggregate.items())
    )
    table.add_column("group")
    table.add_column("score", justify="right")
    if result.chance:
        table.add_column("chance", justify="right")
        table.add_column("x chance", justify="right")
    for group, values in result.groups.items():
        score = values.get("score", values.get("accuracy", 0.0))
        row = [group, f"{score:.3f}"]
        if result.chance:
            chance = result.chance.get(group)
            row += [f"{chance:.3f}", f"{score / chance:.1f}"] if chance else ["-", "-"]
        table.add_row(*row)
    Console().print(table)
