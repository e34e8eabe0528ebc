"""Benchmarks: the synthetic test split, and local parquet copies of the public benchmarks the paper
reports, each read, prompted, generated and scored exactly as lmms-eval 0.3.0 did for the paper.

One file per kind: ``vqa`` (TextVQA, VQAv2, VizWiz, GQA, ChartQA, DocVQA, InfoVQA), ``pope``, ``mmbench``,
``choice`` (SEED, AI2D, ScienceQA-IMG), ``synthetic``. Each benchmark is one ``BenchmarkSpec`` registered
under its name in ``BENCHMARKS``; ``load`` reads the parquet layouts (images decoded lazily)."""

from __future__ import annotations

from typing import Any

from fvl.eval.benchmarks import choice, mmbench, pope, vqa  # noqa: F401 - registers the specs
from fvl.eval.benchmarks.load import load_parquet
from fvl.eval.benchmarks.sample import Benchmark, EvalSample
from fvl.eval.benchmarks.spec import BENCHMARKS, BenchmarkSpec, Scored
from fvl.eval.benchmarks.synthetic import SYNTHETIC, synthetic

__all__ = [
    "BENCHMARKS", "Benchmark", "BenchmarkSpec", "EvalSample", "Scored", "load_parquet", "resolve_benchmark",
    "score", "spec", "synthetic",
]  # fmt: skip


def spec(name: str) -> BenchmarkSpec:
    """The spec of benchmark ``name`` (``synthetic`` included)."""
    return SYNTHETIC if name == "synthetic" else BENCHMARKS.build(name)


def score(name: str, sample: EvalSample, prediction: str, **protocol: Any) -> float:
    """What lmms-eval's ``process_results`` gives for one sample of benchmark ``name`` (the prediction is
    stripped first, as lmms-eval strips every generation). ``protocol``: options such as
    ``pope_parser="llava"``."""
    benchmark = spec(name)
    return benchmark.score(sample, prediction.strip(), benchmark.protocol(protocol))


def resolve_benchmark(text: str, synthetic_samples: int = 700, limit: int = 0) -> Benchmark:
    """``synthetic``, or ``NAME=PATH`` / ``NAME:SPLIT=PATH`` for a public benchmark (e.g.
    ``textvqa=/data/textvqa``, ``vqav2:test=/data/VQAv2`` for the test split's submission file)."""
    if text == "synthetic":
        return synthetic(synthetic_samples)
    if "=" not in text:
        raise ValueError(
            f"benchmark {text!r}: use 'synthetic' or NAME=PATH with NAME one of {', '.join(BENCHMARKS)}"
        )
    name, path = text.split("=", 1)
    name, _, split = name.partition(":")
    return load_parquet(name, path, limit or None, split or None)
