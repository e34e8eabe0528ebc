"""Multiple-choice benchmarks read as lmms-eval 0.3.0 reads them: SEED-Bench (``seedbench``), AI2D
(``ai2d``) and ScienceQA-IMG (``scienceqa_img``). Each keeps its own, different answer rule:

- SEED: the first character of the answer, compared case-insensitively ("Bicycle" counts as B, "(B)" not);
  image and video questions are reported apart (``seed_image`` is the paper's SEED number).
- AI2D: a leading ``X.`` is taken as the letter, otherwise the whole answer; then lmms-eval's exact match
  ignoring case and punctuation ("(B)" counts, "The answer is B." and the option's text do not).
- ScienceQA-IMG: only the bare letter counts (any case); "B." does not.
"""

from __future__ import annotations

import re
from typing import Any

from fvl.eval.benchmarks.sample import EvalSample
from fvl.eval.benchmarks.spec import BenchmarkSpec, Row, Scored, register
from fvl.eval.benchmarks.vqa import exact_match_hf

INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")


def letter(i: int) -> str:
    return chr(ord("A") + i)


def lettered(options: list[str]) -> str:
    return "\n".join(f"{letter(i)}. {o}" for i, o in enumerate(options))


def _answer_letter(row: dict[str, Any]) -> list[str]:
    answer = row.get("answer")
    return [] if answer is None or answer == "" else [letter(int(answer))]


# ---- SEED-Bench ------------------------------------------------------------------------------------------


def _seed_read(row: dict[str, Any]) -> Row:
    options = [str(row[f"choice_{c}"]) for c in "abcd"]
    prompt = f"{row['question']}\n{lettered(options)}{INSTRUCTION}"
    answer = row.get("answer")
    return Row(
        prompt,
        [] if not answer else [str(answer)],
        options,
        group=str(row.get("data_type") or "image"),
        fields={"question_id": row.get("question_id"), "data_type": row.get("data_type") or "image"},
    )


def _seed_score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    pred = prediction.strip()[:1]
    return float(pred.lower().strip() == sample.references[0].lower().strip())


def _seed_aggregate(scored: list[Scored], options: dict[str, Any]) -> dict[str, float]:
    """``seed_image`` / ``seed_video`` over their own questions, ``seed_all`` over all; ``score`` is the
    image accuracy (the paper's SEED-image), or all when there are no image questions."""
    out = {}
    for kind in ("image", "video"):
        part = [s.score for s in scored if s.sample.fields.get("data_type") == kind]
        if part:
            out[f"seed_{kind}"] = sum(part) / len(part)
    out["seed_all"] = sum(s.score for s in scored) / len(scored) if scored else 0.0
    return {"score": out.get("seed_image", out["seed_all"]), **out}


# ---- AI2D ------------------------------------------------------------------------------------------------


def _ai2d_read(row: dict[str, Any]) -> Row:
    options = [str(o) for o in list(row["options"])]
    return Row(f"{row['question']}\n{lettered(options)}{INSTRUCTION}", _answer_letter(row), options)


def ai2d_extract(prediction: str) -> str:
    """lmms-eval's AI2D filter: the letter of a leading ``X.``, else the answer unchanged."""
    m = _LEADING_LETTER.match(prediction)
    return m.group(1) if m else prediction


def _ai2d_score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(exact_match_hf(ai2d_extract(prediction).strip(), sample.references[0]))


# ---- ScienceQA-IMG ---------------------------------------------------------------------------------------


def _sqa_read(row: dict[str, Any]) -> Row:
    options = [str(o) for o in list(row["choices"])]
    # lmms-eval 0.3.0's sqa_doc_to_text, kept as it is: ``if context: context = f"Context: {context}\n"`` and
    # then ``f"{pre_prompt}{context}{question}..."``, so an empty hint adds nothing but a null one adds the
    # text "None" (the hub's ScienceQA-IMG stores "" for no hint; a copy with nulls prompts as the paper's did).
    hint = row.get("hint")
    context = f"Context: {hint}\n" if hint else ("None" if hint is None else "")
    return Row(
        f"{context}{row['question']}\n{lettered(options)}{INSTRUCTION}",
        _answer_letter(row),
        options,
        group=str(row.get("subject") or row.get("category") or "all"),
    )


def _sqa_score(sample: EvalSample, prediction: str, options: dict[str, Any]) -> float:
    return float(prediction.strip().lower() == sample.references[0].strip().lower())


register("seed", BenchmarkSpec(
    task="seedbench", split="test", metric="accuracy of the first character (seed_image reported)",
    read=_seed_read, score=_seed_score, max_new_tokens=1024, aggregate=_seed_aggregate,
))  # fmt: skip
register("ai2d", BenchmarkSpec(
    task="ai2d", split="test", metric="exact match of the leading letter, case and punctuation ignored",
    read=_ai2d_read, score=_ai2d_score, max_new_tokens=16,
))  # fmt: skip
register("scienceqa_img", BenchmarkSpec(
    task="scienceqa_img", split="test", metric="exact match of the bare letter",
    read=_sqa_read, score=_sqa_score, max_new_tokens=16, subfolder="ScienceQA-IMG",
))  # fmt: skip
