"""Exact label masks for every template: the supervised tokens decode to the answers and their end tokens, and
the ids are the rendered conversation tokenised in one go - for every kind of tokenizer the presets use."""

import pytest

from fvl.config.model import LLMConfig
from fvl.models.llm import llm_tokenizer_path
from fvl.text import SupervisionError, TemplateError, get_template, load_tokenizer
from fvl.text.templates import IGNORE_INDEX, normalize_conversation

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
            "<|endoftext|>"
        )
    else:
        assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nA chat between")
        assert (
            t.input_ids.count(tok.bos_token_id) == 0
        )  # the tiny tokenizer adds no BOS: neither does the template
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n3<|eot_id|>")


def test_plain_template_supervises_caption_and_newline(tok):
    conv = [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "a red circle"},
    ]
    t = get_template("plain").tokenize(conv, tok, image_tokens=4)
    assert tok.decode(t.input_ids) == "<image>" * 4 + "a red circle\n"  # the question is dropped
    assert [tok.decode(s) for s in supervised_spans(t.labels)] == ["a red circle\n"]
    assert t.labels[:4] == [IGNORE_INDEX] * 4


def test_system_turn_replaces_the_default(tok):
    conv = [{"role": "system", "content": "Be brief."}, *CONV[:2]]
    t = get_template("phi3").tokenize(conv, tok, image_tokens=1)
    assert tok.decode(t.input_ids).startswith("<|system|>\nBe brief.<|end|>\n<|user|>")


def test_generation_prompt_is_the_training_prefix(tok):
    template = get_template("phi3")
    train = template.tokenize(CONV[:2], tok, image_tokens=3)
    prompt = template.prompt(CONV[0]["value"], tok, image_tokens=3)
    assert prompt.input_ids
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
        CONV, tok, image_tokens=2, max_length=len(full.input_ids) - 4
    )  # cuts the last answer
    assert t.input_ids == full.input_ids[:-4] and t.labels == full.labels[:-4]
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


# ---- every kind of tokenizer ---------------------------------------------------------------------------------
from tests.text.tokenizer_kinds import KINDS  # noqa: E402

# Phi-3.5-mini-instruct's own chat template (the jinja of its tokenizer_config.json)
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request, tmp_path_factory):
    return request.param, KINDS[request.param](tmp_path_factory.mktemp(request.param))


def _expand(ids, tok, image_tokens):
    return [i for tid in ids for i in ([tid] * image_tokens if tid == tok.image_token_id else [tid])]


@pytest.mark.parametrize("name", ["plain", "phi3", "llama3"])
def test_ids_are_the_rendered_text_tokenised_in_one_go(kind, name):
    label, tok = kind
    template = get_template(name)
    t = template.tokenize(CONV if name != "plain" else CONV[:2], tok, image_tokens=3)
    turns = normalize_conversation(CONV if name != "plain" else CONV[:2])
    text, _ = template.render(template.segments(turns, tok))
    assert t.input_ids == _expand(tok(text).input_ids, tok, 3), label
    answers = [a["value"] for a in (CONV if name != "plain" else CONV[:2]) if a["from"] == "gpt"]
    decoded = [tok.decode(s).strip() for s in supervised_spans(t.labels)]
    assert decoded == [a + END[name].strip() for a in answers], (label, decoded)


@pytest.mark.parametrize("name", ["plain", "phi3", "llama3"])
def test_bos_follows_the_tokenizer_in_every_template(kind, name):
    label, tok = kind
    adds_bos = tok("x").input_ids[0] == tok.bos_token_id
    ids = get_template(name).tokenize(CONV[:2], tok, image_tokens=1).input_ids
    assert ids.count(tok.bos_token_id) == int(adds_bos) and (ids[0] == tok.bos_token_id) == adds_bos, label


def test_phi3_equals_the_models_own_chat_template(kind):
    label, tok = kind
    conv = [{"role": "system", "content": "You are a helpful AI assistant."}]
    conv += [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in CONV]
    own = tok.apply_chat_template(conv, chat_template=PHI35_CHAT_TEMPLATE, tokenize=True, return_dict=False)
    if tok("x").input_ids[0] == tok.bos_token_id:
        own = [
            tok.bos_token_id,
            *own,
        ]  # apply_chat_template adds no special tokens; our BOS is the tokenizer's
    assert get_template("phi3").tokenize(CONV, tok, image_tokens=1).input_ids == own, label
    prompt_own = tok.apply_chat_template(conv[:2], chat_template=PHI35_CHAT_TEMPLATE, tokenize=True,
                                         add_generation_prompt=True, return_dict=False)  # fmt: skip
    prompt = get_template("phi3").prompt(CONV[0]["value"], tok, image_tokens=1).input_ids
    assert prompt[-len(prompt_own) :] == prompt_own


def test_a_token_across_an_answer_boundary_is_an_error(tok):
    from fvl.text.templates import ChatTemplate

    # "red" is one token of the tiny vocabulary: an answer "re" followed by a masked "d" cannot be split
    odd = ChatTemplate(name="odd", default_system=None, system="", user="{text} ", answer_end="",
                       after_answer="d", stop=None)  # fmt: skip
    with pytest.raises(TemplateError, match="straddles") as err:
        odd.tokenize([{"from": "human", "value": "q"}, {"from": "gpt", "value": "re"}], tok, image_tokens=1)
    assert err.value.reason == "token_straddles"
