"""Benchmark metrics as torchmetrics ``Metric`` subclasses, each reproducing a standard evaluator exactly.

=========================  ===============================================================================
``VQAAccuracy``            VQAv2 / TextVQA accuracy as lmms-eval computes it (``EvalAIAnswerProcessor``), by
                           release (``protocol``: 0.3.0, the paper's, by default)
``ANLS``                   DocVQA / InfoVQA ANLS as lmms-eval computes it (``lmms_eval/api/metrics.py``)
``RelaxedAccuracy``        ChartQA relaxed accuracy (lmms-eval ``relaxed_correctness``, from Qwen-VL)
``POPEMetrics``            POPE accuracy / precision / recall / F1 / yes-ratio (lmms-eval ``pope``, or
                           LLaVA ``eval_pope.py`` with ``parser="llava"``)
=========================  ===============================================================================

Multiple-choice benchmarks each have their own answer rule in lmms-eval (MMBench's ``can_infer``, SEED's
first character, AI2D's leading letter, ScienceQA's bare letter): they live with their benchmarks in
``fvl.eval.benchmarks``, not here.

Every metric keeps its state as tensors registered with ``dist_reduce_fx="sum"``, so it is exact under DDP
(and ``merge_state`` works). ``update(predictions, references)`` takes one prediction per sample and, per
sample, either a list of reference strings or one plain string (a single reference). The per-sample scores
are plain functions too (``vqa_score``, ``anls_score``, ``relaxed_accuracy_score``, ``pope_answer``) so an
evaluation can write them per sample.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

# the protocol names live with the option's schema (fvl.config.eval), which must not import torch
from fvl.config.eval import VQA_PROTOCOLS, vqa_protocol

__all__ = [
    "ANLS",
    "POPEMetrics",
    "RelaxedAccuracy",
    "VQA_PROTOCOLS",
    "VQAAccuracy",
    "anls_score",
    "levenshtein_distance",
    "normalize_vqa_answer",
    "pope_answer",
    "pope_parse",
    "relaxed_accuracy_score",
    "relaxed_correctness",
    "vqa_protocol",
    "vqa_score",
]

References = Sequence[Sequence[str] | str]


# --------------------------------------------------------------------------------------------------------
# VQA answer normalisation: the tables of lmms-eval's EvalAIAnswerProcessor
# (lmms_eval/tasks/_task_utils/vqa_eval_metric.py, itself from facebookresearch/mmf pythia processors.py).
# They are data: every entry, including the odd ones, must stay as in the original.
# --------------------------------------------------------------------------------------------------------

# Note: the keys with capitals ("Id've", "Im", "Ive") can never match because the text is lower-cased first;
# they are kept because the original has them. "somebody'd" -> "somebodyd" is the original's (reversed) entry.
# fmt: off
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
_PUNCTUATIONS = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# fmt: on
# The original pattern, typo included: "(?!<=\d)" is a negative *lookahead* for the text "<=<digit>" (it was
# meant as a lookbehind), so it always holds before a "." and the pattern removes every "." not followed by
# a digit ("5." -> "5", "a.b" -> "ab", "3.5" and ".5" kept).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The original calls ``PERIOD_STRIP.sub("", text, re.UNICODE)``: the flag lands in the ``count`` argument,
# so at most int(re.UNICODE) == 32 periods are removed. Reproduced, since it is what the standard does.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _word_tokenize(text: str) -> str:
    # Lower-case, drop every "," and "?", detach the possessive "'s" into its own token.
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _process_punctuation(in_text: str) -> str:
    """``EvalAIAnswerProcessor.process_punctuation``: each punctuation mark is deleted when it touches a space
    (or when the text has a comma between digits, e.g. "1,000"), else replaced by a space; then periods not
    followed by a digit are removed. The conditions test the *input* text, not the text being rewritten."""
    has_digit_comma = _COMMA_STRIP.search(in_text) is not None
    out_text = in_text
    for p in _PUNCTUATIONS:
        if p + " " in in_text or " " + p in in_text or has_digit_comma:
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _PERIOD_STRIP.sub("", out_text, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(in_text: str) -> str:
    """``EvalAIAnswerProcessor.process_digit_article``: lower-case, split on whitespace, number words to digits
    ("two" -> "2"), drop articles, then expand contractions ("dont" -> "don't"); joined by single spaces."""
    words = [_NUMBER_MAP.get(w, w) for w in in_text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The full ``EvalAIAnswerProcessor`` (what every VQA prediction goes through): word-tokenise, turn
    newlines and tabs into spaces, strip, ``process_punctuation``, ``process_digit_article``."""
    text = _word_tokenize(text).replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _as_reference_list(refs: Sequence[str] | str) -> list[str]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("every sample needs at least one reference")
    return refs


VQAProtocol = Literal["lmms-eval-0.3.0", "lmms-eval-0.3.5", "lmms-eval-0.5.0", "current"]


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_score(
    prediction: str,
    references: Sequence[str] | str,
    mode: Literal["vqav2", "textvqa"] = "vqav2",
    protocol: VQAProtocol = "lmms-eval-0.3.0",
) -> float:
    """VQA accuracy of one answer, as lmms-eval's ``vqav2_process_results`` (``mode="vqav2"``, the default)
    or ``textvqa_process_results`` (``mode="textvqa"``) computes it, in the release ``protocol`` names.

    ``vqav2``, ``protocol="lmms-eval-0.3.0"`` (the default: lmms-eval 0.2.4 to 0.3.0, the paper's): the
    prediction goes through the full ``normalize_vqa_answer``. The references only have newlines/tabs turned
    into spaces and are stripped; then, *only if they are not all identical*, the references go through
    ``process_punctuation`` + ``process_digit_article`` and so does the prediction (a second time). So when
    all annotators agree, the raw reference is compared with the normalised prediction: ten references "Two"
    score 0 against "two" (normalised to "2"), while nine "Two" and one "2" score 1.0.

    ``vqav2``, ``"lmms-eval-0.3.5"`` (0.3.5 to 0.4.0): as above, but the prediction is not normalised first
    (only newlines/tabs and surrounding spaces): when all references agree the raw strings are compared, so
    "Yes" or "yes," score 0 against ten "yes", which 0.3.0 scores 1.0.

    ``vqav2``, ``"lmms-eval-0.5.0"`` (0.5.0 to 0.7.3; ``"current"``): prediction and every reference go
    through newline/tab/strip, ``process_punctuation`` and ``process_digit_article``, always (no
    identical-references case, and not the word tokenisation of ``normalize_vqa_answer``): "two" scores 1.0
    against ten "Two" (both "2"), which the earlier protocols score 0.

    ``textvqa``: every reference goes through the full ``normalize_vqa_answer`` (no identical-references
    special case), and the prediction is normalised once; the same in every protocol.

    Score: the mean over annotators i of ``min(1, #{j != i : ref_j == pred} / 3)``; leave-one-out is by
    position (VQAv2's answers are distinct by ``answer_id``). With 10 references and m matches this is
    0.3 / 0.6 / 0.9 / 1.0 for m = 1 / 2 / 3 / >= 4. Conventions for fewer references: 2..9 references use
    the same formula (so 2 references both matching give 1/3); a single reference scores 1.0 when the
    prediction equals it after the same processing and 0.0 otherwise (in the 0.3.0 and 0.3.5 protocols the
    all-identical rule applies, so a single reference is not normalised; pre-normalise it with
    ``normalize_vqa_answer`` if it needs it).
    """
    protocol = vqa_protocol(protocol)
    refs = _as_reference_list(references)
    if mode == "textvqa":
        pred = normalize_vqa_answer(prediction)
        refs = [normalize_vqa_answer(r) for r in refs]
    elif mode == "vqav2":
        refs = [_whitespace(r) for r in refs]
        # 0.3.0 normalises the prediction in full first; later releases only clean its whitespace
        pred = normalize_vqa_answer(prediction) if protocol == "lmms-eval-0.3.0" else _whitespace(prediction)
        if protocol == "lmms-eval-0.5.0" or len(set(refs)) > 1:
            refs = [_process_digit_article(_process_punctuation(r)) for r in refs]
            pred = _process_digit_article(_process_punctuation(pred))
    else:
        raise ValueError(f"unknown VQA mode {mode!r}: expected 'vqav2' or 'textvqa'")
    if len(refs) == 1:  # leave-one-out would always give 0: score the single reference directly
        return float(pred == refs[0])
    matches = [r == pred for r in refs]
    total = sum(matches)
    # statistics.mean as in the original, so the float result is bit-identical (e.g. exactly 0.3).
    return float(statistics.mean(min(1, float(total - m) / 3) for m in matches))


# --------------------------------------------------------------------------------------------------------
# ANLS (lmms_eval/api/metrics.py: ``anls`` and ``levenshtein_distance``, from Qwen-VL's infographicsvqa_eval)
# --------------------------------------------------------------------------------------------------------


def levenshtein_distance(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter string
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, references: Sequence[str] | str, threshold: float = 0.5) -> float:
    """ANLS of one answer as lmms-eval computes it for DocVQA / InfoVQA.

    Per reference: both strings are stripped, lower-cased and whitespace-collapsed, and their Levenshtein
    distance is divided by ``max(len(ref.upper()), len(pred.upper()))`` of the *raw* strings (lmms-eval's
    quirk: surrounding/double spaces count in the length, and ``.upper()`` can change it, "ß" -> "SS"), or
    is 0 when both raw strings are empty. The score is ``1 - min`` over references, set to 0 when below
    ``threshold`` (a score of exactly 0.5 is kept).
    """
    refs = _as_reference_list(references)
    det = " ".join(prediction.strip().lower().split())
    values = []
    for ref in refs:
        gt = " ".join(ref.strip().lower().split())
        length = max(len(ref.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein_distance(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# --------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy (lmms_eval/tasks/chartqa/utils.py: ``relaxed_correctness``)
# --------------------------------------------------------------------------------------------------------


def _to_float(text: str) -> float | None:
    # float() itself accepts surrounding whitespace, "1e3", "inf", "nan", "1_000" and a trailing "." ("12.");
    # a trailing "%" (rstrip: any number of them) divides by 100. Anything else is not a number.
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """lmms-eval's ``relaxed_correctness``: when the prediction parses as a float and the target parses to a
    non-zero float, correct iff ``|p - t| / |t| <= max_relative_change``; otherwise (non-numeric, or a
    target of 0) an exact match of the lower-cased strings. Nothing is stripped here."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:  # t == 0.0 (and None) falls back to the string match, as in the original
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy_score(
    prediction: str, references: Sequence[str] | str, max_relative_change: float = 0.05
) -> float:
    """ChartQA relaxed accuracy of one answer: 1.0 if ``relaxed_correctness`` holds for any reference.

    lmms-eval's ``chartqa_process_results`` passes the raw generation (``results[0]``) unchanged: the
    prediction is *not* stripped and a trailing period is *not* removed before comparing (only ``float()``
    itself tolerates surrounding whitespace, so " 12 " still matches 12 numerically, while "Yes." does not
    match "Yes"). We do the same.
    """
    refs = _as_reference_list(references)
    return float(any(relaxed_correctness(prediction, r, max_relative_change) for r in refs))


# --------------------------------------------------------------------------------------------------------
# POPE (LLaVA llava/eval/eval_pope.py)
# --------------------------------------------------------------------------------------------------------


def pope_parse(answer: str) -> Literal["yes", "no"]:
    """LLaVA ``eval_pope.py``: keep the text before the first ".", remove ",", split on single spaces;
    "no" when one of the words is exactly "No", "not" or "no", else "yes". (So "Not really" is "yes" and
    "No!" is "yes": the words are matched exactly, case-sensitively, as in the original.)"""
    text = answer.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


POPE_PARSERS = ("lmms-eval", "llava")


def pope_answer(answer: str, parser: str = "lmms-eval") -> str:
    """The answer as POPE's scorer reads it. ``lmms-eval`` (its ``pope`` task): the answer lower-cased and
    stripped, which counts only when it is exactly "yes" or "no" ("Yes." and "Yes, there is." count as
    neither). ``llava``: ``pope_parse``, always "yes" or "no"."""
    if parser == "llava":
        return pope_parse(answer)
    if parser != "lmms-eval":
        raise ValueError(f"unknown POPE parser {parser!r}: expected one of {POPE_PARSERS}")
    return answer.lower().strip()


def _pope_label(refs: Sequence[str] | str) -> bool:
    refs = _as_reference_list(refs)
    if len(refs) != 1:
        raise ValueError(f"a POPE sample has exactly one label, got {refs!r}")
    label = refs[0].strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE labels are 'yes' or 'no', got {refs[0]!r}")
    return label == "yes"


# --------------------------------------------------------------------------------------------------------
# The torchmetrics classes
# --------------------------------------------------------------------------------------------------------


def _check_batch(predictions: Sequence[str], references: References) -> None:
    # A bare string is a Sequence too: it would silently be scored character by character.
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references are sequences with one entry per sample, not a string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


class _MeanScore(Metric):
    """Mean of a per-sample score. State: the score sum (float64, so that sums over millions of samples stay
    exact to well below reporting precision) and the sample count, both summed across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: list[float]) -> None:
        # Scores are computed for the whole batch before the state changes, so a bad sample leaves it intact.
        self.score_sum += torch.tensor(sum(scores), dtype=torch.float64, device=self.score_sum.device)
        self.total += len(scores)

    def compute(self) -> Tensor:
        """The mean score over all samples seen (all processes); 0.0 before any sample."""
        if self.total == 0:
            return torch.zeros((), dtype=torch.float64, device=self.score_sum.device)
        return self.score_sum / self.total


class VQAAccuracy(_MeanScore):
    """VQAv2 accuracy exactly as lmms-eval's ``vqav2_process_results`` computes it (official VQA evaluation
    with ``EvalAIAnswerProcessor``), or TextVQA's ``textvqa_process_results`` with ``mode="textvqa"``;
    ``protocol`` picks the lmms-eval release (``VQA_PROTOCOLS``; default the paper's 0.3.0).
    See ``vqa_score`` for the normalisation, the identical-references quirk, the 0.3/0.6/0.9/1.0 ladder and
    the conventions for fewer than 10 references."""

    def __init__(
        self,
        mode: Literal["vqav2", "textvqa"] = "vqav2",
        protocol: VQAProtocol = "lmms-eval-0.3.0",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("vqav2", "textvqa"):
            raise ValueError(f"unknown VQA mode {mode!r}: expected 'vqav2' or 'textvqa'")
        self.mode = mode
        self.protocol = vqa_protocol(protocol)

    def update(self, predictions: Sequence[str], references: References) -> None:
        _check_batch(predictions, references)
        self._add(
            [vqa_score(p, r, self.mode, self.protocol) for p, r in zip(predictions, references, strict=True)]
        )


class ANLS(_MeanScore):
    """Average Normalised Levenshtein Similarity for DocVQA / InfoVQA, exactly as lmms-eval's ``anls``
    (``lmms_eval/api/metrics.py``) computes it, raw-length quirk included: see ``anls_score``."""

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold

    def update(self, predictions: Sequence[str], references: References) -> None:
        _check_batch(predictions, references)
        self._add([anls_score(p, r, self.threshold) for p, r in zip(predictions, references, strict=True)])


class RelaxedAccuracy(_MeanScore):
    """ChartQA relaxed accuracy exactly as lmms-eval's ``chartqa_process_results`` / ``relaxed_correctness``
    (5% relative tolerance for numbers, "%" handled, exact lower-cased match otherwise; the prediction is
    not stripped): see ``relaxed_accuracy_score``. With several references a sample counts if any matches."""

    def __init__(self, max_relative_change: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_relative_change = max_relative_change

    def update(self, predictions: Sequence[str], references: References) -> None:
        _check_batch(predictions, references)
        self._add(
            [
                relaxed_accuracy_score(p, r, self.max_relative_change)
                for p, r in zip(predictions, references, strict=True)
            ]
        )


class POPEMetrics(Metric):
    """POPE metrics. ``parser="lmms-eval"`` (the default: lmms-eval 0.3.0's ``pope`` task, whose numbers the
    paper reports): an answer counts only when it is exactly "yes" or "no" after lower-casing and stripping;
    any other answer is wrong for accuracy and outside precision and recall; ``yes_ratio`` is the share of
    "yes" in the *ground truth*. ``parser="llava"`` (LLaVA's ``eval_pope.py``): answers parsed with
    ``pope_parse``; ``yes_ratio`` is the share of "yes" *predictions*.
    References are "yes"/"no" (case-insensitive, stripped; anything else is a ValueError). ``compute()``
    returns ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio``; a ratio whose denominator is
    0 is 0.0 (as in lmms-eval; the original eval_pope.py divides by zero)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: Tensor
    fp: Tensor
    tn: Tensor
    fn: Tensor
    other_yes: Tensor  # answers that are neither "yes" nor "no", by their label
    other_no: Tensor

    def __init__(self, parser: str = "lmms-eval", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if parser not in POPE_PARSERS:
            raise ValueError(f"unknown POPE parser {parser!r}: expected one of {POPE_PARSERS}")
        self.parser = parser
        for name in ("tp", "fp", "tn", "fn", "other_yes", "other_no"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: References) -> None:
        _check_batch(predictions, references)
        labels = [_pope_label(r) for r in references]  # validate all before touching the state
        counts = dict.fromkeys(("tp", "fp", "tn", "fn", "other_yes", "other_no"), 0)
        for pred, label in zip(predictions, labels, strict=True):
            answer = pope_answer(pred, self.parser)
            if answer not in ("yes", "no"):
                counts["other_yes" if label else "other_no"] += 1
                continue
            yes = answer == "yes"
            counts[("t" if yes == label else "f") + ("p" if yes else "n")] += 1
        for name, n in counts.items():
            setattr(self, name, getattr(self, name) + n)

    def compute(self) -> dict[str, Tensor]:
        tp, fp, tn, fn, oy, on = (
            getattr(self, n).double() for n in ("tp", "fp", "tn", "fn", "other_yes", "other_no")
        )
        zero = torch.zeros((), dtype=torch.float64, device=tp.device)

        def div(a: Tensor, b: Tensor) -> Tensor:
            return a / b if b > 0 else zero

        precision, recall = div(tp, tp + fp), div(tp, tp + fn)
        total = tp + fp + tn + fn + oy + on
        yes = tp + fn + oy if self.parser == "lmms-eval" else tp + fp  # ground truth, or predictions
        return {
            "accuracy": div(tp + tn, total),
            "precision": precision,
            "recall": recall,
            "f1": div(2 * precision * recall, precision + recall),
            "yes_ratio": div(yes, total),
        }
