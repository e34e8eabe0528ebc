"""Benchmarks as lists of samples with their metric: the synthetic test split (generated, per-skill) and
local copies of public benchmarks in the lmms-eval / Hugging Face datasets parquet layout.

Each public benchmark is a ``BenchmarkSpec``: how to read a row (image, question, references, options),
the prompt suffix lmms-eval uses for it, and the metric. Add one: a spec and one ``BENCHMARKS`` entry.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fvl.data.synthetic import CHANCE, generate
from fvl.registry import Registry

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class EvalSample:
    id: str
    images: list[Image.Image]
    prompt: str
    references: list[str]
    group: str = "all"  # per-skill / per-category breakdown
    options: list[str] | None = None


@dataclass
class Benchmark:
    name: str
    metric: str  # vqa | vqa_textvqa | anls | relaxed | pope | mc | exact
    samples: list[EvalSample]
    chance: dict[str, float] = field(default_factory=dict)


def synthetic(n: int = 700, seed: int = 0, image_size: int = 64) -> Benchmark:
    """The synthetic test split: ``n`` questions, grouped by kind (colour, shape, count, position, ocr,
    chart, pope), with each kind's chance level."""
    samples = []
    for i in range(n):
        s = generate(i, "test", seed, image_size)
        samples.append(EvalSample(s.id, [s.image], s.question, [s.answer], s.kind))
    return Benchmark("synthetic", "exact", samples, dict(CHANCE))


# ---- public benchmarks in the lmms-eval parquet layout -------------------------------------------------------


def _image(value: Any) -> Image.Image:
    """A datasets ``Image`` feature as stored in parquet: ``{"bytes": ..., "path": ...}`` (or raw bytes)."""
    if isinstance(value, dict):
        value = value.get("bytes") or Path(value["path"]).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    raise ValueError(f"cannot read an image from {type(value).__name__}")


def _answers(value: Any) -> list[str]:
    """Reference answers: a string, a list of strings, or VQAv2's list of ``{"answer": ...}``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in list(value)]


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _options_prompt(question: str, options: list[str], hint: str | None = None) -> str:
    lines = (
        ([hint] if hint else [])
        + [question]
        + [f"{letter}. {opt}" for letter, opt in zip(_letters(len(options)), options, strict=True)]
    )
    return "\n".join(lines) + LETTER


@dataclass(frozen=True)
class BenchmarkSpec:
    metric: str
    read: Callable[
        [dict[str, Any]], tuple[str, list[str], list[str] | None, str]
    ]  # prompt, refs, options, group
    image_column: str = "image"
    id_column: str = "question_id"


def _vqa_row(suffix: str):
    def read(row):
        return (
            row["question"] + suffix,
            _answers(row.get("answers", row.get("answer"))),
            None,
            str(row.get("question_type", "all") or "all"),
        )

    return read


def _mmbench_row(row):
    options = [
        row[k] for k in "ABCDEFG" if k in row and isinstance(row[k], str) and row[k] not in ("", "nan")
    ]
    hint = (
        row.get("hint") if isinstance(row.get("hint"), str) and row.get("hint") not in ("", "nan") else None
    )
    return (
        _options_prompt(row["question"], options, hint),
        [str(row["answer"])],
        options,
        str(row.get("category", "all")),
    )


def _seed_row(row):
    options = [row[f"choice_{c}"] for c in "abcd"]
    return (
        _options_prompt(row["question"], options),
        [str(row["answer"])],
        options,
        str(row.get("question_type_id", "all")),
    )


def _indexed_options_row(options_key: str, hint_key: str | None = None):
    def read(row):
        options = [str(o) for o in list(row[options_key])]
        hint = (
            row.get(hint_key)
            if hint_key and isinstance(row.get(hint_key), str) and row.get(hint_key)
            else None
        )
        answer = _letters(len(options))[int(row["answer"])]
        return (
            _options_prompt(row["question"], options, hint),
            [answer],
            options,
            str(row.get("category", row.get("subject", "all"))),
        )

    return read


def _pope_row(row):
    return (
        row["question"] + SHORT,
        [str(row["answer"]).strip().lower()],
        None,
        str(row.get("category", "all")),
    )


BENCHMARKS: Registry[BenchmarkSpec] = Registry("benchmark")
_SPECS = {
    "textvqa": BenchmarkSpec("vqa_textvqa", _vqa_row(SHORT)),
    "vqav2": BenchmarkSpec("vqa", _vqa_row(SHORT)),
    "vizwiz": BenchmarkSpec(
        "vqa",
        _vqa_row("\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT),
    ),
    "gqa": BenchmarkSpec("vqa", _vqa_row(SHORT)),
    "pope": BenchmarkSpec("pope", _pope_row),
    "chartqa": BenchmarkSpec("relaxed", _vqa_row("\nAnswer the question with a single word.")),
    "docvqa": BenchmarkSpec("anls", _vqa_row(SHORT), id_column="questionId"),
    "infovqa": BenchmarkSpec("anls", _vqa_row(SHORT), id_column="questionId"),
    "mmbench": BenchmarkSpec("mc", _mmbench_row, id_column="index"),
    "seed": BenchmarkSpec("mc", _seed_row),
    "ai2d": BenchmarkSpec("mc", _indexed_options_row("options")),
    "scienceqa_img": BenchmarkSpec("mc", _indexed_options_row("choices", "hint")),
}
for _name, _spec in _SPECS.items():
    BENCHMARKS.register(_name)(lambda s=_spec: s)


def load_parquet(name: str, path: str | Path, limit: int | None = None) -> Benchmark:
    """A public benchmark from local parquet file(s) (a file or a folder of ``*.parquet``)."""
    import pyarrow.parquet as pq

    spec = BENCHMARKS.build(name)
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"benchmark {name}: no parquet files at {path}")
    samples = []
    for file in files:
        for i, row in enumerate(pq.read_table(file).to_pylist()):
            prompt, refs, options, group = spec.read(row)
            image = row.get(spec.image_column)
            images = (
                []
                if image is None
                else [_image(im) for im in image]
                if isinstance(image, list)
                else [_image(image)]
            )
            if "<image>" not in prompt:
                prompt = "<image>\n" * len(images) + prompt
            sid = str(row.get(spec.id_column, f"{file.stem}-{i}"))
            samples.append(EvalSample(sid, images, prompt, refs, group, options))
            if limit and len(samples) >= limit:
                return Benchmark(name, spec.metric, samples)
    return Benchmark(name, spec.metric, samples)


def resolve_benchmark(spec: str, synthetic_samples: int = 700) -> Benchmark:
    """``synthetic``, or ``NAME=PATH`` for a public benchmark (e.g. ``textvqa=/data/textvqa/validation``)."""
    if spec == "synthetic":
        return synthetic(synthetic_samples)
    if "=" not in spec:
        raise ValueError(
            f"benchmark {spec!r}: use 'synthetic' or NAME=PATH with NAME one of {', '.join(BENCHMARKS)}"
        )
    name, path = spec.split("=", 1)
    return load_parquet(name, path)
