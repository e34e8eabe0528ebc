"""Benchmark metric kernels against hand-checked values of the standard evaluators (lmms-eval VQAv2/TextVQA,
ANLS, ChartQA relaxed accuracy, POPE as lmms-eval and as LLaVA's script count it)."""

from __future__ import annotations

import pytest
import torch

from fvl.eval.metrics import (
    ANLS,
    POPEMetrics,
    RelaxedAccuracy,
    VQAAccuracy,
    anls_score,
    levenshtein_distance,
    normalize_vqa_answer,
    pope_parse,
    relaxed_accuracy_score,
    relaxed_correctness,
    vqa_score,
)

# ------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),  # number words
        ("ten dogs", "10 dogs"),
        ("none", "0"),
        ("a dog", "dog"),  # articles
        ("The Red Car", "red car"),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # word_tokenize drops every comma
        ("yes.", "yes"),  # trailing period
        ("Yes!", "yes"),
        ("what?", "what"),
        ("3.5", "3.5"),  # a period before a digit is kept
        ("5.", "5"),
        ("a.b", "ab"),
        ("hello-world", "hello world"),  # punctuation not touching a space becomes a space
        ("hello - world", "hello world"),  # touching a space: removed
        ("(red)", "red"),
        ("it's", "it 's"),  # possessive detached
        ("  Yes\n", "yes"),
        ("Im", "im"),  # the capitalised table keys never match after lower-casing
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_period_strip_is_capped_at_32():
    # The original passes re.UNICODE (32) as re.sub's count: only the first 32 periods go.
    assert normalize_vqa_answer("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)]
)
def test_vqa_ladder_with_ten_references(matches, expected):
    refs = ["dog"] * matches + ["cat"] * (10 - matches)
    assert vqa_score("Dog.", refs) == expected  # exactly, as statistics.mean gives it


@pytest.mark.parametrize(
    ("pred", "refs", "expected"),
    [
        ("two", ["2"] * 5 + ["3"] * 5, 1.0),
        ("2", ["two"] * 5 + ["3"] * 5, 1.0),  # references are normalised when they differ
        ("dog", ["a dog"] * 4 + ["cat"] * 6, 1.0),
        ("don't", ["dont"] * 3 + ["no"] * 7, 0.9),
        ("1000", ["1,000"] * 2 + ["100"] * 8, 0.6),
        ("yes", ["yes."] + ["no"] * 9, 0.3),
    ],
)
def test_vqa_references_normalised_when_they_differ(pred, refs, expected):
    assert vqa_score(pred, refs) == expected


@pytest.mark.parametrize(
    ("pred", "same", "odd_one"),
    [("two", "Two", "2"), ("1,000", "1,000", "1000"), ("yes", "yes.", "yes"), ("dog", "a dog", "dog")],
)
def test_vqa_identical_references_are_not_normalised(pred, same, odd_one):
    # lmms-eval's vqav2_process_results only normalises the references when they are not all identical:
    # ten identical raw references never match the normalised prediction...
    assert vqa_score(pred, [same] * 10) == 0.0
    # ...while one differing annotator switches normalisation on, and then nine of ten agree.
    assert vqa_score(pred, [same] * 9 + [odd_one]) == 1.0
    # TextVQA's process_results normalises every reference with the full processor.
    assert vqa_score(pred, [same] * 10, mode="textvqa") == 1.0


def test_vqa_identical_references_matching_raw():
    assert vqa_score("Yes.", ["yes"] * 10) == 1.0


def test_vqa_fewer_than_ten_references():
    assert vqa_score("Dog.", ["dog"]) == 1.0
    assert vqa_score("Dog.", "dog") == 1.0  # a plain string is one reference
    assert vqa_score("cat", ["dog"]) == 0.0
    assert vqa_score("two", ["Two"]) == 0.0  # one reference is "all identical": not normalised
    # Leave-one-out on 3: dog_1 and dog_2 see one other match (1/3), cat sees two (2/3).
    assert vqa_score("dog", ["dog", "dog", "cat"]) == pytest.approx(4 / 9)
    assert vqa_score("dog", ["dog", "dog"]) == pytest.approx(1 / 3)
    assert vqa_score("dog", ["dog"] * 4 + ["cat"]) == pytest.approx(1.0)


def test_vqa_metric_mean():
    m = VQAAccuracy()
    m.update(["dog", "two", "cat"], [["dog"] * 2 + ["cat"] * 8, "2", ["fish"] * 10])
    value = m.compute()
    assert value.ndim == 0 and value.is_floating_point()
    assert value.item() == pytest.approx((0.6 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        VQAAccuracy(mode="okvqa")


# ------------------------------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein_distance("kitten", "sitting") == 3
    assert levenshtein_distance("flaw", "lawn") == 2
    assert levenshtein_distance("", "abc") == levenshtein_distance("abc", "") == 3
    assert levenshtein_distance("same", "same") == 0


def test_anls_values():
    assert anls_score("  Hello   World ", ["hello world"]) == 1.0
    assert anls_score("abxd", ["abcd"]) == 0.75
    assert anls_score("abxy", ["abcd"]) == 0.5  # exactly at the threshold: kept
    assert anls_score("axyz", ["abcd"]) == 0.0  # 0.25 < 0.5
    assert anls_score("axyz", ["abcd"], threshold=0.2) == 0.25
    assert anls_score("abxd", ["zzzz", "abcd"]) == 0.75  # best reference
    assert anls_score("", [""]) == 1.0  # both empty
    assert anls_score("", ["abc"]) == 0.0


def test_anls_raw_length_quirk():
    # The distance is on the cleaned strings but divided by the raw lengths: "  abcd  " counts 8 characters,
    # so 2 edits give 1 - 2/8, not 1 - 2/4.
    assert anls_score("abxy", ["  abcd  "]) == 0.75
    assert anls_score("  abxy  ", ["abcd"]) == 0.75
    # ...measured after .upper(): "ß" is one character but "SS" two.
    assert anls_score("xx", ["ßß"]) == 0.5


def test_anls_metric():
    m = ANLS()
    m.update(["abxd", "axyz"], ["abcd", ["abcd"]])
    assert m.compute().item() == pytest.approx(0.375)


# ------------------------------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize(
    ("pred", "target", "correct"),
    [
        ("10.5", "10", True),  # exactly 5%
        ("9.5", "10", True),
        ("10.6", "10", False),
        ("9.4", "10", False),
        ("12%", "0.12", True),  # percentages are divided by 100
        ("0.12", "12%", True),
        ("12", "12%", False),
        ("12.3%", "12%", True),
        ("0", "0", True),  # target 0: string match
        ("0.0", "0", False),
        ("0.01", "0", False),
        ("0%", "0%", True),
        ("Yes", "yes", True),  # non-numeric: lower-cased exact match
        ("Yes.", "yes", False),  # no trailing period removal in lmms-eval
        (" yes", "yes", False),  # no stripping either...
        (" 12 ", "12", True),  # ...but float() ignores surrounding spaces
        ("12.", "12", True),  # float("12.") == 12.0
        ("twelve", "12", False),
    ],
)
def test_relaxed_correctness(pred, target, correct):
    assert relaxed_correctness(pred, target) is correct


def test_relaxed_accuracy_metric():
    assert relaxed_accuracy_score("11", ["5", "11.5"]) == 1.0  # any reference
    assert relaxed_accuracy_score("11", "5") == 0.0
    m = RelaxedAccuracy()
    m.update(["10.5", "Yes.", "Paris"], ["10", ["yes"], "paris"])
    assert m.compute().item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("No, there is not.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is no dog in the image.", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("The cat is not there", "no"),
        ("no", "no"),
        ("Not really", "yes"),  # "Not" is not one of the words, as in eval_pope.py
        ("No!", "yes"),
        ("", "yes"),
    ],
)
def test_pope_parse(answer, parsed):
    assert pope_parse(answer) == parsed


def test_pope_confusion_matrix_llava_parser():
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["Yes"] * 3 + ["No."] + ["Yes, it is."] * 2 + ["No, there is not."] * 4
    # TP 3, FN 1, FP 2, TN 4; yes_ratio: of the predictions
    m = POPEMetrics(parser="llava")
    m.update(preds, labels)
    out = {k: v.item() for k, v in m.compute().items()}
    assert out == pytest.approx(
        {"accuracy": 0.7, "precision": 0.6, "recall": 0.75, "f1": 2 / 3, "yes_ratio": 0.5}
    )


def test_pope_lmms_eval_counts_only_exact_yes_and_no():
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["Yes"] * 3 + ["No."] + ["Yes, it is."] * 2 + [" no "] * 3 + ["no"]
    # "No." and "Yes, it is." are neither answer: wrong, outside precision / recall
    # TP 3, FN 0, FP 0, TN 4, others 3; yes_ratio: of the ground truth (4 / 10)
    m = POPEMetrics()
    m.update(preds, labels)
    out = {k: v.item() for k, v in m.compute().items()}
    assert out == pytest.approx(
        {"accuracy": 0.7, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.4}
    )
    with pytest.raises(ValueError, match="parser"):
        POPEMetrics(parser="other")


def test_pope_zero_denominators_and_labels():
    m = POPEMetrics(parser="llava")
    m.update(["No", "No"], [" YES ", ["yes"]])
    out = {k: v.item() for k, v in m.compute().items()}
    assert out == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        m.update(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        m.update(["yes"], [["yes", "no"]])
    assert m.tp.item() + m.fn.item() == 2  # the failed updates left the state alone


# ------------------------------------------------------------------------------------------------- generic

CASES = [
    (
        VQAAccuracy,
        ["dog", "two", "cat", "yes", "1,000", "red"],
        [
            ["dog"] * 3 + ["cat"] * 7,
            "2",
            ["cat", "dog"],
            ["yes"] * 10,
            ["1,000"] * 10,
            ["red"] * 2 + ["blue"],
        ],
    ),
    (
        ANLS,
        ["abxd", "axyz", "hello", "", "Paris", "abxy"],
        ["abcd", "abcd", ["Hello"], "x", "paris", "  abcd  "],
    ),
    (
        RelaxedAccuracy,
        ["10.5", "Yes.", "12%", "0.0", "x", "3"],
        ["10", "yes", "0.12", "0", "X", ["1", "3.1"]],
    ),
    (
        POPEMetrics,
        ["Yes", "No, not.", "yes", "There is no dog.", "Yes.", "no"],
        ["yes", "yes", "no", "no", "yes", "no"],
    ),
]


def _values(metric) -> dict[str, float]:
    out = metric.compute()
    return {k: v.item() for k, v in out.items()} if isinstance(out, dict) else {"value": out.item()}


@pytest.mark.parametrize(("cls", "preds", "refs"), CASES, ids=[c[0].__name__ for c in CASES])
def test_accumulate_reset_and_merge(cls, preds, refs):
    whole = cls()
    whole.update(preds, refs)
    expected = _values(whole)

    two_calls = cls()
    two_calls.update(preds[:2], refs[:2])
    two_calls.update(preds[2:], refs[2:])
    assert _values(two_calls) == pytest.approx(expected)

    # Two simulated processes, each with half the data, merged as DDP's sum-reduction would.
    rank0, rank1 = cls(), cls()
    rank0.update(preds[::2], refs[::2])
    rank1.update(preds[1::2], refs[1::2])
    rank0.merge_state(rank1)
    assert _values(rank0) == pytest.approx(expected)

    whole.reset()
    whole.update(preds[:1], refs[:1])
    single = cls()
    single.update(preds[:1], refs[:1])
    assert _values(whole) == pytest.approx(_values(single))

    out = whole.compute()
    for value in out.values() if isinstance(out, dict) else [out]:
        assert value.ndim == 0 and value.is_floating_point()


@pytest.mark.parametrize("cls", [c[0] for c in CASES], ids=[c[0].__name__ for c in CASES])
def test_input_validation(cls):
    m = cls()
    with pytest.raises(ValueError):
        m.update(["yes", "no"], ["yes"])
    with pytest.raises(TypeError):
        m.update("yes", ["y", "e", "s"])
    with pytest.raises(ValueError):
        m.update(["yes"], [[]])


def test_states_are_summed_tensors():
    for cls, *_ in CASES:
        m = cls()
        assert m._defaults and all(isinstance(v, torch.Tensor) for v in m._defaults.values())
        assert all(m._reductions[name].__name__ == "dim_zero_sum" for name in m._defaults)
