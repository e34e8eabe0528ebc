"""POPE (object hallucination), as lmms-eval 0.3.0's ``pope`` task by default: only an answer that is
exactly "yes" or "no" after lower-casing and stripping counts ("Yes, there is." is wrong and outside
precision / recall), and ``yes_ratio`` is the share of "yes" in the ground truth. ``pope_parser=llava``
takes LLaVA's ``eval_pope.py`` instead (the text before the first period; "no" when a word is No / no /
not, else "yes"; ``yes_ratio`` over the predictions). The results record which parser ran."""

from __future__ import annotations

from typing import Any

from fvl.eval.benchmarks.sample import EvalSample
from fvl.eval.benchmarks.spec import BenchmarkSpec, Row, Scored, register
from fvl.eval.metrics import POPE_PARSERS, POPEMetrics, pope_answer


def _read(row: dict[str, Any]) -> Row:
    label = str(row["answer"]).lower().strip()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE answers are yes or no, got {row['answer']!r}")
    return Row(
        row["question"].strip() + "\nAnswer the question using a single word or phrase.",
        [label],
        group=str(row.get("category") or "all"),
        fields={"question_id": row.get("question_id")},
    )


def _score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(pope_answer(prediction, options["pope_parser"]) == sample.references[0])


def _aggregate(scored: list[Scored], options: dict[str, Any]) -> dict[str, float]:
    metric = POPEMetrics(parser=options["pope_parser"])
    metric.update([s.prediction for s in scored], [s.sample.references for s in scored])
    return {k: float(v) for k, v in metric.compute().items()}


register("pope", BenchmarkSpec(
    task="pope", split="test", metric="accuracy / precision / recall / F1 of exact yes-no answers",
    read=_read, score=_score, max_new_tokens=128, aggregate=_aggregate,
    options={"pope_parser": POPE_PARSERS},
))  # fmt: skip
