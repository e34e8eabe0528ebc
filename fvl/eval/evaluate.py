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

from fvl.config.eval import EvalConfig
from fvl.config.tracking import TrackingConfig
from fvl.eval.benchmarks import Benchmark, EvalSample, Scored, resolve_benchmark
from fvl.models.loading import load_weights_file
from fvl.runs.folder import RunDir
from fvl.runs.tracking import experiment_id, tracking_uri
from fvl.runs.weights import find_weights
from fvl.util.files import replacing, write_text_atomic

log = logging.getLogger(__name__)

LMMS_EVAL_VERSION = "0.3.0"  # the lmms-eval release whose protocols the benchmark specs reproduce


@dataclass
class EvalResult:
    """One benchmark's outcome: the reported numbers (overall and per group), the settings that produced
    them, and one record per question. A test split (no answers) has no numbers: ``submission`` lists its
    predictions for the evaluation server."""

    benchmark: str
    metric: str
    aggregate: dict[str, float]
    groups: dict[str, dict[str, float]]
    chance: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    submission: list[tuple[EvalSample, str]] = field(default_factory=list)
    agreement: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "metric": self.metric, "settings": self.settings,
                "aggregate": self.aggregate, "groups": self.groups, "chance": self.chance,
                **({"batch_agreement": self.agreement} if self.agreement else {}),
                "samples": self.records}  # fmt: skip


def _answers(model, samples: list[EvalSample], max_new_tokens: int) -> list[str]:
    images = [s.load_images() for s in samples]  # decoded now, a batch at a time
    return generate_answers(model, images, [s.prompt for s in samples], max_new_tokens)


def generate_answers(model, images: list[list[Any]], prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to one batch of questions, each with its images, prompted as lmms-eval's llava prompts
    them: the one evaluation path of ``fvl eval`` and of lmms-eval's ``--model fvl``
    (``fvl.integrations.lmms_eval``), so both give the same answers to the same prompts."""
    prompts = [image_prompt(model, p, len(ims)) for p, ims in zip(prompts, images, strict=True)]
    predictions = model.generate(images, prompts, max_new_tokens=max_new_tokens)
    return [p.strip() for p in predictions]  # lmms-eval strips every generation before scoring


def image_prompt(model, prompt: str, n_images: int) -> str:
    """``prompt`` with the placeholders of several images as lmms-eval's llava places them: one line,
    space-separated, before the text, unless the prompt places them itself. A single image's prompt is left
    to the model, whose own layout (the placeholder on its own line first) is llava's too."""
    token = getattr(getattr(model, "tokenizer", None), "image_token", None)
    if not token or n_images < 2 or token in prompt:
        return prompt
    return " ".join([token] * n_images) + "\n" + prompt


@torch.no_grad()
def predict(
    model,
    samples: list[EvalSample],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: bool = False,
    label: str = "",
) -> list[str]:
    """Greedy answers to ``samples``, in their order, ``batch_size`` prompts at a time."""
    from rich.progress import Progress

    model.eval()
    predictions: list[str] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"eval {label}", total=len(samples))
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            predictions += _answers(model, chunk, max_new_tokens)
            bar.advance(task, len(chunk))
    return predictions


def score(
    bench: Benchmark, predictions: list[str], settings: dict[str, Any], options: dict[str, Any]
) -> EvalResult:
    """The benchmark's own scoring of ``predictions`` (one per sample, in order), aggregated overall and per
    group; a test split's predictions become its submission instead."""
    spec = bench.spec
    result = EvalResult(bench.result_name, spec.metric, {}, {}, dict(bench.chance), settings=settings)
    if not bench.labelled:
        result.submission = list(zip(bench.samples, predictions, strict=True))
        result.records = [{"id": s.id, "prompt": s.prompt, "prediction": p} for s, p in result.submission]
        return result
    scored = [
        Scored(s, p, spec.score(s, p, options)) for s, p in zip(bench.samples, predictions, strict=True)
    ]
    by_group: dict[str, list[Scored]] = defaultdict(list)
    for item in scored:
        by_group[item.sample.group].append(item)
    result.aggregate = spec.aggregate(scored, options)
    result.groups = {g: spec.aggregate(items, options) for g, items in sorted(by_group.items())}
    result.records = [
        {"id": x.sample.id, "group": x.sample.group, "prompt": x.sample.prompt, "prediction": x.prediction,
         "references": x.sample.references, "score": x.score}
        for x in scored
    ]  # fmt: skip
    return result


def eval_settings(bench: Benchmark, tokens: int, batch_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """How a result was produced, stored beside it."""
    return {
        "lmms_eval_task": bench.task, "lmms_eval_version": LMMS_EVAL_VERSION, "split": bench.split,
        "max_new_tokens": tokens, "batch_size": batch_size, "samples": len(bench.samples), **options,
    }  # fmt: skip


def evaluate(
    model,
    bench: Benchmark,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    protocol: dict[str, Any] | None = None,
    agreement: int = 0,
) -> EvalResult:
    """Greedy answers for every sample of ``bench`` (``max_new_tokens``: the benchmark's own unless given)
    and their scores, aggregated as the benchmark's spec says. ``agreement``: answer the first N samples
    again one at a time and report how many answers equal the batched ones."""
    options = bench.spec.protocol(protocol)
    tokens = max_new_tokens or bench.spec.max_new_tokens
    predictions = predict(model, bench.samples, tokens, batch_size, progress, bench.result_name)
    result = score(bench, predictions, eval_settings(bench, tokens, batch_size, options), options)
    if agreement:
        result.agreement = batch_agreement(model, bench.samples[:agreement], predictions, tokens, batch_size)
    return result


def metrics_of(result: EvalResult) -> dict[str, float]:
    """A result's numbers under their MLflow keys: ``eval/<bench>/<name>`` overall, ``eval/<bench>/<group>``
    for each group's headline score and ``eval/<bench>/<group>/<name>`` for its other numbers."""
    out = {f"eval/{result.benchmark}/{name}": value for name, value in result.aggregate.items()}
    for group, values in result.groups.items():
        for name, value in values.items():
            key = (
                f"eval/{result.benchmark}/{group}"
                if name == "score"
                else f"eval/{result.benchmark}/{group}/{name}"
            )
            out[key] = value
    return out


def batch_agreement(
    model, samples: list[EvalSample], batched: list[str], max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """The share of ``samples`` whose answer generated alone equals its answer generated in batches of
    ``batch_size`` (``batched``, in sample order), and the questions where they differ."""
    alone = [_answers(model, [s], max_new_tokens)[0] for s in samples]
    differ = [
        {"id": s.id, "batched": b, "alone": a}
        for s, b, a in zip(samples, batched, alone, strict=False)
        if a != b
    ]
    n = len(alone)
    return {"samples": n, "batch_size": batch_size, "agreement": (n - len(differ)) / n if n else 1.0,
            "differences": differ}  # fmt: skip


@dataclass
class EvalReport:
    """What ``evaluate_checkpoint`` did: the checkpoint scored, results per benchmark, their JSON files and
    the MLflow run they were logged on."""

    checkpoint: Path
    results: list[EvalResult]
    paths: list[Path]
    mlflow_run_id: str
    failures: dict[str, str] = field(default_factory=dict)  # benchmark -> what went wrong


def evaluate_checkpoint(
    spec: str | Path,
    cfg: EvalConfig | None = None,
    output_dir: str | Path = "runs",
    out: str | Path | None = None,
    tracking: TrackingConfig | None = None,
    progress: bool = True,
) -> EvalReport:
    """Score a checkpoint (a weights file, a run folder, ``latest`` or ``mlflow:RUN_ID``) on ``cfg.bench``: JSON per benchmark in
    ``out`` (default: the run's ``eval/``) and metrics ``eval/<bench>/*`` on the checkpoint's own MLflow run.
    The one evaluation path: ``fvl eval`` and sweeps both call it."""
    cfg = cfg or EvalConfig()
    checkpoint = find_weights(spec, output_dir).path
    device, dtype = cfg.placement()
    model = load_weights_file(checkpoint).to(device=device, dtype=getattr(torch, dtype))
    run = RunDir.of(checkpoint)
    folder = Path(out) if out else run.eval_dir if run else checkpoint.parent / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    results, paths, failures = [], [], {}
    for bench_spec in cfg.bench:
        # One benchmark that fails (a missing folder, a writer that refuses an answer) fails alone: the
        # others still run, and each one's results are on disk as soon as it finishes.
        try:
            bench = resolve_benchmark(bench_spec, cfg.samples, cfg.limit)
            result = evaluate(
                model, bench, cfg.batch_size, cfg.max_new_tokens, progress, cfg.protocol(), cfg.agreement
            )
            result.settings.update(device=device, dtype=dtype)
            written = [folder / f"{bench.result_name}.json"]
            write_text_atomic(written[0], json.dumps(result.to_json(), indent=1))
            if result.submission:
                written.append(write_submission(bench, result, folder / "submissions"))
        except Exception as e:  # noqa: BLE001 - reported with the others at the end
            log.error("%s failed: %s: %s", bench_spec, type(e).__name__, e)
            failures[bench_spec] = f"{type(e).__name__}: {e}"
            continue
        results.append(result)
        paths += written
    run_id = log_to_mlflow(results, checkpoint, paths, tracking) if results else ""
    return EvalReport(checkpoint, results, paths, run_id, failures)


def write_submission(bench: Benchmark, result: EvalResult, folder: Path) -> Path:
    """A test split's predictions in the file its evaluation server takes (the file lmms-eval writes)."""
    if bench.spec.submission is None:
        raise ValueError(
            f"{bench.name}: this split has no answers and the benchmark has no submission format"
        )
    path = folder / bench.spec.submission.filename
    # never a half-written file where the server's file should be; the writer picks its format by the suffix
    with replacing(path, suffix=path.suffix) as tmp:
        bench.spec.submission.write(result.submission, tmp)
    return path


def log_to_mlflow(
    results: list[EvalResult],
    checkpoint: Path,
    json_paths: list[Path],
    tracking: TrackingConfig | None = None,
) -> str:
    """Metrics ``eval/<bench>/<name>`` (and per group) on the checkpoint's own run when the store has it,
    else on a new run tagged ``eval_of`` in the tracking experiment (given, else the checkpoint's run's,
    else the default); the JSON files as artifacts. Returns the run id. The metrics are logged at the
    training step of the checkpoint's weights, on the axis of the scores logged while it trained
    (``eval.during_training``)."""
    from mlflow.tracking import MlflowClient

    run = RunDir.of(checkpoint)
    if tracking is None:
        tracking = TrackingConfig()
        if run is not None and run.config_path.exists():
            tracking.experiment = run.config().tracking.experiment
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
    step = checkpoint_step(checkpoint)
    for r in results:
        # how the numbers were produced, beside them (tags: a training run's params are immutable)
        for key, value in r.settings.items():
            client.set_tag(run_id, f"eval/{r.benchmark}/{key}", str(value))
        if r.agreement:
            client.log_metric(
                run_id, f"eval/{r.benchmark}/batch_agreement", r.agreement["agreement"], step=step
            )
        for key, value in metrics_of(r).items():
            client.log_metric(run_id, key, value, step=step)
    for p in json_paths:
        client.log_artifact(
            run_id, str(p), artifact_path="eval" if p.parent.name != "submissions" else "eval/submissions"
        )
    return run_id


def checkpoint_step(checkpoint: Path) -> int:
    """The training step of a checkpoint's weights (its safetensors metadata), 0 when it does not say."""
    if checkpoint.suffix != ".safetensors":
        return 0
    from fvl.models.checkpoint import read_metadata

    try:
        return int(read_metadata(checkpoint).get("global_step", 0))
    except (OSError, ValueError):
        return 0


def print_results(result: EvalResult) -> None:
    from rich.console import Console
    from rich.table import Table

    if not result.aggregate:  # a test split: predictions went to a submission file
        Console().print(f"{result.benchmark}: {len(result.records)} answers for the submission file")
        return
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
        score = next(iter(values.values()))  # each spec puts its headline number first
        row = [group, f"{score:.3f}"]
        if result.chance:
            chance = result.chance.get(group)
            row += [f"{chance:.3f}", f"{score / chance:.1f}"] if chance else ["-", "-"]
        table.add_row(*row)
    Console().print(table)
