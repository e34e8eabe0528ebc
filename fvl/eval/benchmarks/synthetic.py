"""The synthetic test split as a benchmark: generated questions grouped by skill kind (colour, shape, count,
position, ocr, chart, pope), scored by exact match of the normalised single-word answer, with each kind's
chance level beside it."""

from __future__ import annotations

import functools
from typing import Any

from fvl.eval.benchmarks.sample import Benchmark, EvalSample
from fvl.eval.benchmarks.spec import BenchmarkSpec, Row
from fvl.synthetic import CHANCE, generate


def normalize_short(text: str) -> str:
    """Synthetic answers are single words: compare lower-cased, stripped, without a trailing period."""
    return text.strip().lower().rstrip(".").strip()


def _score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(normalize_short(prediction) in {normalize_short(r) for r in sample.references})


def _no_rows(row: dict[str, Any]) -> Row:
    raise TypeError("the synthetic benchmark is generated, not read from rows")


SYNTHETIC = BenchmarkSpec(
    task="(fvl synthetic test split)",
    split="test",
    metric="exact match of the normalised answer, per skill kind",
    read=_no_rows,
    score=_score,
    max_new_tokens=16,
    chance=dict(CHANCE),
)


def synthetic(n: int = 700, seed: int = 0, image_size: int = 64) -> Benchmark:
    """The synthetic test split: ``n`` questions (drawn from the data seed ``seed``, not a run's seed)."""
    return Benchmark("synthetic", SYNTHETIC, list(_test_split(n, seed, image_size)), dict(CHANCE))


@functools.lru_cache(maxsize=2)
def _test_split(n: int, seed: int, image_size: int) -> tuple[EvalSample, ...]:
    """Drawn once per process and kept (12 KB a picture at 64 px): a sweep scores every run on the same
    questions, and drawing them cost about 1.5 s per evaluation of 350."""
    samples = []
    for i in range(n):
        s = generate(i, "test", seed, image_size)
        ref = lambda image=s.image: image  # noqa: E731 - the picture drawn with its question
        samples.append(EvalSample(s.id, s.question, [s.answer], s.kind, image_refs=[ref]))
    return tuple(samples)
