"""``BenchmarkSpec``: everything that decides a benchmark's number, in one place per benchmark: where its
rows and images are, the prompt, the generation length, the per-sample score, the aggregation and the
submission file of its test split. Each spec reproduces one lmms-eval task (``task``) as lmms-eval 0.3.0
ran it for the paper; where another protocol exists, it is an option and the results record which one ran.

Add a benchmark: one spec in the module of its kind and one ``BENCHMARKS.register`` line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvl.eval.benchmarks.sample import EvalSample
from fvl.util.registry import Registry


@dataclass
class Row:
    """What a spec reads from one question row: the prompt (text after the image placeholders), the
    references (empty on a test split), the options of a multiple-choice question, the breakdown group,
    and the values scoring / aggregation / submission need."""

    prompt: str
    references: list[str]
    options: list[str] | None = None
    group: str = "all"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    sample: EvalSample
    prediction: str
    score: float


def mean_score(scored: list[Scored]) -> dict[str, float]:
    """The mean of the per-sample scores (lmms-eval's ``mean`` aggregation)."""
    return {"score": sum(s.score for s in scored) / len(scored) if scored else 0.0}


@dataclass(frozen=True)
class Submission:
    """A test split's predictions in the file its evaluation server takes."""

    filename: str
    write: Callable[[list[tuple[EvalSample, str]], Path], None]


def json_submission(filename: str, entry: Callable[[EvalSample, str], dict[str, Any]]) -> Submission:
    def write(predictions: list[tuple[EvalSample, str]], path: Path) -> None:
        path.write_text(json.dumps([entry(s, p) for s, p in predictions]))

    return Submission(filename, write)


@dataclass(frozen=True)
class ImageJoin:
    """Images kept in their own table: the folder ``images`` (beside ``questions``) whose rows have an
    ``id_column``, matched to the question rows' ``key``."""

    questions: str
    images: str
    key: str
    id_column: str = "id"


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark's protocol. ``read`` turns a row into a ``Row`` (options: the spec's protocol
    options, e.g. POPE's parser); ``score(sample, prediction, options)`` is the per-sample value of
    lmms-eval's ``process_results``; ``aggregate`` turns the scored samples into the reported numbers."""

    task: str  # the lmms-eval task whose numbers this reproduces
    split: str  # the split the paper reports (its HF dataset config / split)
    metric: str  # the metric, in words (the README's table)
    read: Callable[[dict[str, Any]], Row]
    score: Callable[[EvalSample, str, dict[str, Any]], float]
    max_new_tokens: int
    aggregate: Callable[[list[Scored], dict[str, Any]], dict[str, float]] = lambda s, o: mean_score(s)
    submission: Submission | None = None
    id_column: str = "question_id"
    image_column: str = "image"
    image_join: ImageJoin | None = None
    options: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # protocol option -> allowed values
    #                                                                     (the first is lmms-eval's)
    chance: dict[str, float] = field(default_factory=dict)
    # the dataset's folder for this benchmark inside the hub dataset's own layout (lmms-lab/MMBench keeps
    # English under en/, lmms-lab/DocVQA holds DocVQA/ and InfographicVQA/, ScienceQA ScienceQA-IMG/)
    subfolder: str = ""

    def protocol(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The protocol options in force: lmms-eval's unless overridden; unknown or invalid ones refused."""
        chosen = {name: values[0] for name, values in self.options.items()}
        for name, value in (overrides or {}).items():
            if name not in self.options:
                continue  # an option of another benchmark (one --protocol serves several)
            if value not in self.options[name]:
                raise ValueError(f"{self.task}: {name} must be one of {self.options[name]}, not {value!r}")
            chosen[name] = value
        return chosen


BENCHMARKS: Registry[BenchmarkSpec] = Registry("benchmark")


def register(name: str, spec: BenchmarkSpec) -> BenchmarkSpec:
    BENCHMARKS.register(name)(lambda: spec)
    return spec
