"""ChatML (Qwen2.5) and Qwen3 templates: the ids equal ``apply_chat_template`` with the models' own jinja
templates on a Qwen-form tokenizer built offline, on multi-turn, multi-image, system-prompt and text-only
conversations; the labels are exactly each answer and its ``<|im_end|>``; Qwen3's empty think block is masked.

``chat_templates/chatml.jinja`` is the ``chat_template`` of the Qwen2.5-Instruct models' tokenizer_config.json
(shared by every size); ``chat_templates/qwen3.jinja`` is Qwen3's (the text TRL matches Qwen3 tokenizers
against, byte for byte: trl/chat_templates/qwen3.jinja)."""

from pathlib import Path

import pytest

from fvl.assets.builtin import resolve
from fvl.text import TemplateError, get_template, load_tokenizer
from fvl.text.templates import IGNORE_INDEX
from tests.text.test_templates import supervised_spans

JINJA = {name: (Path(__file__).parent / "chat_templates" / f"{name}.jinja").read_text()
         for name in ("chatml", "qwen3")}  # fmt: skip
JINJA["qwen3_thinking"] = JINJA["qwen3"]  # one jinja template; enable_thinking decides the generation prompt
THINKING = {"chatml": False, "qwen3": False, "qwen3_thinking": True}


def _c(*turns, system=None):
    """LLaVA-style turns from alternating user / assistant strings."""
    conv = [{"from": "system", "value": system}] if system else []
    return conv + [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


CONVERSATIONS = [
    _c("<image>\nWhat colour is the circle?", "Red."),
    _c("<image>\nDescribe the image.", "A red circle above a blue square.", "How many shapes?", "2"),
    _c("<image>\n<image>\nWhich image has more shapes?", "The second one."),
    _c("<image>\nRead the text.", "STOP", "<image>\nAnd this one?", "GO 42", "Same font?", "no"),
    _c("Hello there", "Hi! How can I help?"),  # text only
    _c("<image>\nWhat is shown?", "a cat", system="You are a careful assistant."),
    _c("What is 12 + 30?", "42", "And times 2?", "84", system="Answer with a number only."),
    _c("<image>\nList the objects.", "- a box\n- a pen\n- a cup"),  # newlines inside an answer
    _c("<image>\nCaption:", "  leading spaces and trailing ones  "),
    _c("Translate 'chat' to English.", "cat (in French, 'chat' means cat) — done."),  # non-ASCII
    _c("<image>\nCount the stars.", "7", "<image>\nNow here?", "11", "<image>\nAnd here?", "0"),
    _c("Question one?", "Answer one.", "Question two?", "Answer two.", system="Be brief.\nUse English."),
    _c("<image>\nWhere is the dog?", "Bottom left, next to the tree."),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve("builtin:qwen-tiny-tokenizer"))


def _messages(conv):
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in conv]


def test_the_tokenizer_has_the_qwen_form(tok):
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for marker in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1, marker
    assert tok("123", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(d) for d in "123"]


@pytest.mark.parametrize("name", ["chatml", "qwen3", "qwen3_thinking"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_ids_equal_the_models_own_chat_template(tok, name, index):
    conv = CONVERSATIONS[index]
    template = get_template(name)
    own = tok.apply_chat_template(
        _messages(conv), chat_template=JINJA[name], tokenize=True, return_dict=False
    )
    ours = template.tokenize(conv, tok, image_tokens=1)
    assert ours.input_ids == own
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    assert [tok.decode(s) for s in supervised_spans(ours.labels)] == [a + "<|im_end|>" for a in answers]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(ours.labels, ours.input_ids, strict=True))


@pytest.mark.parametrize("name", ["chatml", "qwen3", "qwen3_thinking"])
@pytest.mark.parametrize("index", [0, 3, 5, 6])
def test_generation_prompts_equal_the_models_own(tok, name, index):
    conv = CONVERSATIONS[index][:-1]  # up to the last user turn
    own = tok.apply_chat_template(_messages(conv), chat_template=JINJA[name], tokenize=True,
                                  add_generation_prompt=True, enable_thinking=THINKING[name], return_dict=False)  # fmt: skip
    assert get_template(name).prompt(conv, tok, image_tokens=1).input_ids == own


def test_qwen3_masks_the_empty_think_block_and_writes_it_only_before_the_last_answer(tok):
    t = get_template("qwen3").tokenize(CONVERSATIONS[3], tok, image_tokens=2)
    text = tok.decode(t.input_ids)
    assert text.count("<think>\n\n</think>\n\n") == 1 and text.endswith(
        "<think>\n\n</think>\n\nno<|im_end|>\n"
    )
    think = tok.convert_tokens_to_ids("<think>")
    assert t.labels[t.input_ids.index(think)] == IGNORE_INDEX
    assert t.input_ids.count(tok.image_token_id) == 4 and t.num_images == 2
    assert tok.bos_token_id is None and t.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_stop_ids_are_im_end(tok):
    for name in ("chatml", "qwen3"):
        assert get_template(name).stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_template_the_tokenizer_lacks_markers_for_is_refused(tok):
    from fvl.config.model import LLMConfig
    from fvl.models.llm import llm_tokenizer_path

    phi_tokenizer = load_tokenizer(llm_tokenizer_path(None, LLMConfig()))
    with pytest.raises(TemplateError, match="<\\|im_end\\|>.*model.text.template"):
        get_template("qwen3").check_tokenizer(phi_tokenizer)
    with pytest.raises(TemplateError, match="<\\|end\\|>"):
        get_template("phi3").check_tokenizer(tok)
    get_template("plain").check_tokenizer(tok)  # no markers
