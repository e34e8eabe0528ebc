"""Exact label masks for every template: the supervised tokens decode to the answers and their end tokens."""

import pytest

from fvl.models.config import LLMConfig
from fvl.models.llm import llm_tokenizer_path
from fvl.text import SupervisionError, TemplateError, get_template, load_tokenizer
from fvl.text.templates import IGNORE_INDEX

END = {"plain": "\n", "phi3": "<|end|>", "llama3": "<|eot_id|>"}
CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "3"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(llm_tokenizer_path(None, LLMConfig()))


def supervised_spans(labels):
    """Maximal runs of supervised labels."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


@pytest.mark.parametrize("name", ["phi3", "llama3"])
def test_chat_templates_supervise_exactly_the_answers(tok, name):
    t = get_template(name).tokenize(CONV, tok, image_tokens=5)
    spans = supervised_spans(t.labels)
    assert [tok.decode(s) for s in spans] == [f"The circle is red.{END[name]}", f"3{END[name]}"]
    # every label is either -100 or the input id at that position (labels are not shifted here)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(t.labels, t.input_ids, strict=True))
    assert t.input_ids.count(tok.image_token_id) == 5 and t.num_images == 1
    # the full text is the documented template
    text = tok.decode(t.input_ids).replace("<image>" * 5, "<image>")
    if name == "phi3":
        assert text == (
            "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\nWhat colour is the circle?<|end|>\n"
            "<|assistant|>\nThe circle is red.<|end|>\n<|user|>\nHow many shapes are there?<|end|>\n<|assistant|>\n3<|end|>\n"
        )
    else:
        assert text.startswith(tok.bos_token + "<|start_header_id|>system<|end_header_id|>\n\nA chat between")
        assert t.input_ids.count(tok.bos_token_id) == 1  # no double BOS
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n3<|eot_id|>")


def test_plain_template_supervises_caption_and_newline(tok):
    conv = [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "a red circle"},
    ]
    t = get_template("plain").tokenize(conv, tok, image_tokens=4)
    assert (
        tok.decode(t.input_ids) == tok.bos_token + "<image>" * 4 + "a red circle\n"
    )  # the question is dropped
    assert [tok.decode(s) for s in supervised_spans(t.labels)] == ["a red circle\n"]
    assert t.labels[: 1 + 4] == [IGNORE_INDEX] * 5


def test_system_turn_replaces_the_default(tok):
    conv = [{"role": "system", "content": "Be brief."}, *CONV[:2]]
    t = get_template("phi3").tokenize(conv, tok, image_tokens=1)
    assert tok.decode(t.input_ids).startswith("<|system|>\nBe brief.<|end|>\n<|user|>")


def test_generation_prompt_is_the_training_prefix(tok):
    template = get_template("phi3")
    train = template.tokenize(CONV[:2], tok, image_tokens=3)
    prompt = template.prompt(CONV[0]["value"], tok, image_tokens=3)
    first_supervised = next(i for i, lab in enumerate(train.labels) if lab != IGNORE_INDEX)
    assert prompt.input_ids == train.input_ids[:first_supervised]


@pytest.mark.parametrize(
    "conv, error, match",
    [
        ([], TemplateError, "empty conversation"),
        ([{"from": "human", "value": "hi"}], TemplateError, "end with an assistant"),
        (
            [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}],
            TemplateError,
            "do not alternate",
        ),
        (
            [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
            TemplateError,
            "do not alternate",
        ),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], TemplateError, "empty gpt turn"),
        ([{"from": "robot", "value": "q"}], TemplateError, "unknown role"),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}],
            TemplateError,
            "in the assistant turn",
        ),
    ],
)
def test_bad_conversations_raise(tok, conv, error, match):
    with pytest.raises(error, match=match):
        get_template("phi3").tokenize(conv, tok, image_tokens=2)


def test_truncation_never_leaves_a_sample_without_supervision(tok):
    template = get_template("phi3")
    with pytest.raises(SupervisionError):
        template.tokenize(CONV, tok, image_tokens=2, max_length=20)  # the system prompt alone is longer
    with pytest.raises(TemplateError, match="cut image tokens"):
        template.tokenize(CONV, tok, image_tokens=200, max_length=100)
    full = template.tokenize(CONV, tok, image_tokens=2)
    t = template.tokenize(
        CONV, tok, image_tokens=2, max_length=len(full.input_ids) - 3
    )  # cuts the last answer
    assert t.input_ids == full.input_ids[:-3] and t.labels == full.labels[:-3]
    assert [tok.decode(s) for s in supervised_spans(t.labels)][0] == "The circle is red.<|end|>"


def test_image_count_check(tok):
    with pytest.raises(TemplateError, match="1 image placeholders for 2 images"):
        get_template("phi3").tokenize(CONV, tok, image_tokens=2, num_images=2)
    two = [{"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "no"}]
    assert (
        get_template("llama3")
        .tokenize(two, tok, image_tokens=3, num_images=2)
        .input_ids.count(tok.image_token_id)
        == 6
    )
