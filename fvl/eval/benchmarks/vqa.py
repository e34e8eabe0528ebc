"""Open-ended benchmarks: TextVQA, VQAv2, VizWiz, GQA, ChartQA, DocVQA, InfoVQA, each as lmms-eval 0.3.0's
task of the same name reads, prompts and scores it (the task is named in each spec). Predictions reach
``score`` stripped, as lmms-eval strips every generation before ``process_results``. VQAv2's scoring changed
in later lmms-eval releases: its ``vqa_protocol`` option picks one (``fvl.eval.metrics.VQA_PROTOCOLS``);
TextVQA's and VizWiz's did not change."""

from __future__ import annotations

import string
from typing import Any

from fvl.eval.benchmarks.sample import EvalSample
from fvl.eval.benchmarks.spec import BenchmarkSpec, ImageJoin, Row, Scored, json_submission, register
from fvl.eval.metrics import VQA_PROTOCOLS, anls_score, normalize_vqa_answer, relaxed_correctness, vqa_score

SHORT = "\nAnswer the question using a single word or phrase."
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
ONE_WORD = "\nAnswer the question with a single word."


def answers(value: Any) -> list[str]:
    """Reference answers: a string, a list of strings, or VQAv2's list of ``{"answer": ...}``; none on a
    test split (``None`` or empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in list(value)]


def question_row(suffix: str, capitalize: bool = False, answer_key: str = "answers", group: str = ""):
    """``question`` (``str.capitalize()``d where lmms-eval does: TextVQA and VizWiz, which also
    lower-cases the rest of the question) + ``suffix``."""

    def read(row: dict[str, Any]) -> Row:
        question = row["question"]
        return Row(
            (question.capitalize() if capitalize else question) + suffix,
            answers(row.get(answer_key)),
            group=str(row.get(group) or "all") if group else "all",
            fields={k: row[k] for k in ("question_id", "questionId", "type") if k in row},
        )

    return read


def _vqa(mode: str):
    def score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
        # only VQAv2's spec has the option: TextVQA's and VizWiz's scoring never changed
        protocol = options.get("vqa_protocol", "lmms-eval-0.3.0")
        return vqa_score(prediction, sample.references, mode, protocol)  # type: ignore[arg-type]

    return score


def exact_match_hf(prediction: str, reference: str) -> bool:
    """lmms-eval's ``exact_match_hf_evaluate`` with ``ignore_case`` and ``ignore_punctuation`` (GQA): both
    lower-cased, ASCII punctuation deleted (not replaced by a space), then compared whole."""
    table = str.maketrans("", "", string.punctuation)
    return prediction.lower().translate(table) == reference.lower().translate(table)


def _gqa_score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(exact_match_hf(prediction, sample.references[0]))


def _anls(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return anls_score(prediction, sample.references)


def _relaxed(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(relaxed_correctness(prediction, sample.references[0]))


def _chartqa_aggregate(scored: list[Scored], options: dict[str, Any]) -> dict[str, float]:
    """``relaxed_overall`` and, over their own questions only, the human-written and augmented splits."""
    out = {"relaxed_overall": sum(s.score for s in scored) / len(scored) if scored else 0.0}
    for split, key in (("human_test", "relaxed_human_split"), ("augmented_test", "relaxed_augmented_split")):
        part = [s.score for s in scored if s.sample.fields.get("type") == split]
        if part:
            out[key] = sum(part) / len(part)
    return out


def _question_id(sample: EvalSample, key: str = "question_id") -> Any:
    value = sample.fields.get(key, sample.id)
    return int(value) if isinstance(value, (int, float)) or str(value).isdigit() else value


def _normalised_answer(key: str):
    return lambda s, p: {key: _question_id(s, key), "answer": normalize_vqa_answer(p)}


register("textvqa", BenchmarkSpec(
    task="textvqa_val", split="validation", metric="VQA accuracy, every reference normalised",
    read=question_row(SHORT, capitalize=True), score=_vqa("textvqa"), max_new_tokens=1024,
    submission=json_submission("textvqa-test-submission.json", _normalised_answer("question_id")),
))  # fmt: skip
register("vqav2", BenchmarkSpec(
    task="vqav2_val", split="validation", metric="VQA accuracy (references normalised only if they differ)",
    read=question_row(SHORT), score=_vqa("vqav2"), max_new_tokens=16,
    submission=json_submission("vqav2-test-submission.json", _normalised_answer("question_id")),
    options={"vqa_protocol": tuple(VQA_PROTOCOLS)},
))  # fmt: skip
register("vizwiz", BenchmarkSpec(
    task="vizwiz_vqa_val", split="val", metric="VQA accuracy, every reference normalised",
    read=question_row(UNANSWERABLE, capitalize=True), score=_vqa("textvqa"), max_new_tokens=1024,
    submission=json_submission(
        "vizwiz_vqa-test-submission.json",
        lambda s, p: {"image": f"{s.fields.get('question_id', s.id)}.jpg", "answer": normalize_vqa_answer(p)},
    ),
))  # fmt: skip
register("gqa", BenchmarkSpec(
    task="gqa", split="testdev", metric="exact match, case and punctuation ignored",
    read=question_row(SHORT, answer_key="answer"), score=_gqa_score, max_new_tokens=16, id_column="id",
    image_join=ImageJoin("testdev_balanced_instructions", "testdev_balanced_images", key="imageId"),
))  # fmt: skip
register("chartqa", BenchmarkSpec(
    task="chartqa", split="test", metric="relaxed accuracy (5 % on numbers)",
    read=question_row(ONE_WORD, answer_key="answer", group="type"), score=_relaxed, max_new_tokens=16,
    aggregate=_chartqa_aggregate,
))  # fmt: skip
for _name, _task, _folder in (
    ("docvqa", "docvqa_val", "DocVQA"),
    ("infovqa", "infovqa_val", "InfographicVQA"),
):
    register(_name, BenchmarkSpec(
        task=_task, split="validation", metric="ANLS (threshold 0.5)", subfolder=_folder,
        read=question_row(SHORT), score=_anls, max_new_tokens=32, id_column="questionId",
        submission=json_submission(
            f"{_name}_test_for_submission.json",
            lambda s, p: {"questionId": _question_id(s, "questionId"), "answer": p},
        ),
    ))  # fmt: skip
