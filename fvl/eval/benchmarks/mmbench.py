"""MMBench (English dev), as lmms-eval 0.3.0's ``mmbench_en_dev``: its prompt, its answer matching
(``can_infer``) and CircularEval.

- Prompt: ``"{hint} {question} There are several options:\\nA. ...\\nB. ..."``, then a blank line and the
  instruction (no hint when it is missing / NaN / "nan"; options A-E that are present and not "nan").
- Matching: a letter standing alone among the answer's words ("B", "I think B"; but an "A" in an answer of
  more than three words is read as an article), else a letter wrapped as "B." / "(B)" / "B)" / ":B" ...,
  else the one option whose text occurs in the answer. lmms-eval then asks GPT-3.5 to match what is left;
  fvl does not: an answer nothing matches counts as wrong (so fvl's number is a lower bound of one with a
  working GPT key; without one, lmms-eval itself guesses a random letter after ~45 s of failed requests).
- CircularEval: the dev split holds rotated copies of each question (``index`` = original + k * 1e6, each
  with its own answer letter); a question counts only if every copy is answered right. The score is the
  mean over the original questions, overall and per category.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

from fvl.eval.benchmarks.sample import EvalSample
from fvl.eval.benchmarks.spec import BenchmarkSpec, Row, Scored, Submission, register

log = logging.getLogger(__name__)

LETTERS = "ABCDE"
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
COPY_STRIDE = 1_000_000
# The wrappers lmms-eval tries, in order, when no bare letter stands alone.
_WRAPPED = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
            (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))  # fmt: skip


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def mmbench_prompt(row: dict[str, Any]) -> str:
    """The text lmms-eval's ``mmbench_doc_to_text`` gives for the llava model."""
    options = "There are several options:\n"
    for key in sorted(k for k in LETTERS if k in row and row[k]):
        if not _missing(row[key]) and row[key] != "nan":
            options += f"{key}. {row[key]}\n"
    options = options.rstrip("\n")
    hint = row.get("hint")
    query = f"{row['question']} {options}"
    if not _missing(hint) and hint != "nan":
        query = f"{hint} {query}"
    return f"{query}\n{INSTRUCTION}"


def _letter_option(answer: str) -> str | None:
    words = [w.strip() for w in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + c + suffix in words for c in LETTERS)

    if count() == 1 and not ("A" in words and len(words) > 3):  # "A" among many words: an article
        return next(c for c in LETTERS if c in words)
    for prefix, suffix in _WRAPPED:
        if count(prefix, suffix) == 1:
            return next(c for c in LETTERS if prefix + c + suffix in words)
    return None


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """The option letter lmms-eval's ``can_infer`` reads in ``answer`` (None where it would ask GPT).
    ``choices``: the option texts of A-D that are present (E is never matched by text, as in lmms-eval)."""
    letter = _letter_option(answer)
    if letter:
        return letter
    text = answer.lower()
    found = [k for k, v in choices.items() if str(v).lower() in text]
    return found[0] if len(found) == 1 else None


def _read(row: dict[str, Any]) -> Row:
    answer = row.get("answer")
    choices = {c: row[c] for c in "ABCD" if c in row and not _missing(row[c])}
    fields = {
        k: row.get(k) for k in ("index", "question", "hint", "category", "L2-category", "source", "split")
    }
    fields.update({c: row.get(c, "nan") for c in LETTERS})
    fields["choices"] = choices
    return Row(
        mmbench_prompt(row),
        [] if _missing(answer) or answer == "" else [str(answer)],
        options=[str(row[c]) for c in LETTERS if c in row and not _missing(row[c]) and row[c] != "nan"],
        group=str(row.get("category") or "uncategorized"),
        fields=fields,
    )


def _score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(can_infer(prediction, dict(sample.fields["choices"])) == sample.references[0])


def circular_accuracy(scored: list[Scored]) -> dict[str, float]:
    """CircularEval: per original question (``index`` < 1e6), 1 when it and all its rotated copies
    (``index`` % 1e6 equal) are right; the mean over originals (``score``), beside the plain mean over
    rows (``row_accuracy``) and the number of questions that had copies."""
    copies: dict[int, list[float]] = defaultdict(list)
    for s in scored:
        copies[int(s.sample.fields["index"]) % COPY_STRIDE].append(s.score)
    originals = {int(s.sample.fields["index"]) for s in scored if int(s.sample.fields["index"]) < COPY_STRIDE}
    hits = [float(all(v == 1.0 for v in copies[i])) for i in sorted(originals)]
    return {
        "score": sum(hits) / len(hits) if hits else 0.0,
        "row_accuracy": sum(s.score for s in scored) / len(scored) if scored else 0.0,
        "circular_questions": float(sum(len(copies[i]) > 1 for i in originals)),
    }


def _write_xlsx(predictions: list[tuple[EvalSample, str]], path) -> None:
    """``mmbench_en_test_results.xlsx``: lmms-eval's columns, the raw (stripped) answer as prediction."""
    import pandas as pd
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    columns = (
        "index",
        "question",
        "answer",
        "prediction",
        "hint",
        "source",
        "split",
        "category",
        "L2-category",
    )
    rows = [
        {**{k: s.fields.get(k) for k in columns}, "answer": s.references[0] if s.references else None,
         "prediction": p, **{c: s.fields.get(c, "nan") for c in LETTERS}}
        for s, p in predictions
    ]  # fmt: skip
    cleaned = 0
    for row in rows:  # an answer may hold control characters (\x15, ...) that an xlsx cannot store
        for key, value in row.items():
            if isinstance(value, str) and ILLEGAL_CHARACTERS_RE.search(value):
                row[key] = ILLEGAL_CHARACTERS_RE.sub("", value)
                cleaned += 1
    if cleaned:
        log.warning("mmbench submission: %d cell(s) held characters an xlsx cannot store; removed", cleaned)
    pd.DataFrame(rows).to_excel(path, index=False)


register("mmbench", BenchmarkSpec(
    task="mmbench_en_dev", split="dev", metric="CircularEval accuracy, lmms-eval's answer matching without GPT",
    read=_read, score=_score, max_new_tokens=1024, aggregate=lambda s, o: circular_accuracy(s),
    submission=Submission("mmbench_en_test_results.xlsx", _write_xlsx), id_column="index", subfolder="en",
))  # fmt: skip
