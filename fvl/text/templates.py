"""Chat templates with exact label masks, tokenised as the model itself tokenises.

A conversation is rendered as segments of text, each either masked (label -100) or supervised, joined into
one string and tokenised in one go (what the model's own chat template does). The supervised tokens are
those whose characters, by the tokenizer's offset mapping, lie inside a supervised segment; no string
search or token counting can go wrong (the original's "tokenization mismatch" that silently masked whole
samples), and a token straddling a boundary is an error with a reason. Supervised: each assistant answer
and its end token; everything else is masked. A sample with nothing to supervise raises
``SupervisionError``; a malformed conversation raises ``TemplateError``. Generation prompts are built by the
same code, so training and inference see identical token sequences.

Templates: the authors' formats ``plain`` (stage 1: image + caption + newline), ``phi3`` (ending with the
tokenizer's EOS, as Phi-3.5's own template does) and ``llama3``; and ChatML for Qwen-family LLMs: ``chatml``
(Qwen2.5's template, with its default system prompt) and ``qwen3`` (Qwen3's: no default system prompt, and the
empty think block ``<think>\n\n</think>\n\n`` its template writes before the last answer, and its generation
prompt with ``enable_thinking=False``; the block is masked, the answer and its ``<|im_end|>`` supervised), and
``qwen3_thinking`` (the same training text; its generation prompt is ``enable_thinking=True``'s, ending at the
assistant header, so the model writes its own think block). BOS
comes from the tokenizer's own post-processor in every template: one for Llama 3, not the original's double
BOS, and none for Qwen, whose tokenizers have none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fvl.util.registry import Registry

IGNORE_INDEX = -100
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class TemplateError(ValueError):
    """The conversation cannot be rendered. ``reason`` is the short code a data pipeline counts skips by:
    ``no_conversations``, ``empty_turn``, ``bad_roles``, ``placeholder_mismatch``, ``too_long``."""

    def __init__(self, message: str, reason: str = "bad_conversation") -> None:
        super().__init__(message)
        self.reason = reason


class SupervisionError(TemplateError):
    """Rendering left no supervised token (e.g. truncation cut every answer)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "no_supervision")


@dataclass
class Tokenized:
    """One tokenised sample: ids with each image placeholder expanded to ``image_tokens`` ids."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


def normalize_conversation(conversation: Sequence[Mapping]) -> list[tuple[str, str]]:
    """LLaVA (``from``/``value``) or OpenAI (``role``/``content``) turns -> ``[(role, text)]``, checked:
    an optional system turn, then user/assistant strictly alternating, starting with the user."""
    if not conversation:
        raise TemplateError("empty conversation", "no_conversations")
    turns = []
    for i, turn in enumerate(conversation):
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise TemplateError(f"turn {i}: unknown role {role!r}", "bad_roles")
        if not isinstance(text, str) or not text.strip():
            raise TemplateError(f"turn {i}: empty {role} turn", "empty_turn")
        turns.append((ROLE_ALIASES[role], text))
    body = turns[1:] if turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(
                f"roles do not alternate: turn {i} is {role}, expected {expected}", "bad_roles"
            )
    return turns


@dataclass(frozen=True)
class ChatTemplate:
    """Text around turns. ``{system}`` and ``{text}`` are filled in.

    A conversation is rendered to one string and tokenised once, exactly as the model's own chat template
    would be (turn-by-turn tokenisation differs for SentencePiece-style tokenizers: a leading ``▁`` on every
    answer, a ``▁`` before each newline that the chat tokens strip). The supervised tokens are found from
    the offset mapping: those inside an answer or its end token. A token that straddles such a boundary is
    an error (reason ``token_straddles``), never a silent mask. BOS follows the tokenizer's own convention
    (its post-processor), the same in every template.
    """

    name: str
    default_system: str | None
    system: str  # the system block, with {system}
    user: str  # the user block up to and including the assistant header, with {text}
    answer_end: str  # supervised after each answer (the end-of-turn token)
    after_answer: str  # masked text after it (separator before the next user turn)
    stop: str | None  # the token generation stops at (None: the tokenizer's EOS)
    images_only_prompt: bool = False  # plain: the user turn contributes its image placeholders only
    end_with_eos: bool = False  # a training conversation ends with the tokenizer's EOS (masked)
    # masked text between the assistant header and the last answer of a training conversation, and after
    # the assistant header of a generation prompt (qwen3: the empty think block of ``enable_thinking=False``)
    last_answer_prefix: str = ""
    # what a generation prompt ends with after the assistant header, when it differs from the above
    # (qwen3_thinking: nothing, so the model writes its own think block)
    generation_prefix: str | None = None

    def special_strings(self) -> list[str]:
        """The template's marker tokens (``<|im_start|>``, ``<|end|>``...): each must be one token of the
        tokenizer it is used with, or the rendered text would be spelled out in ordinary tokens."""
        import re

        text = "".join((self.system, self.user, self.answer_end, self.after_answer, self.last_answer_prefix))
        return sorted(set(re.findall(r"<\|[a-z_]+\|>", text)))

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise ``TemplateError`` when a marker of this template is not a single token of ``tokenizer``
        (``model.text.template`` and the tokenizer come from different model families)."""
        missing = [
            s for s in self.special_strings() if len(tokenizer(s, add_special_tokens=False).input_ids) != 1
        ]
        if missing:
            raise TemplateError(
                f"chat template {self.name!r} uses {missing}, which the tokenizer "
                f"({type(tokenizer).__name__}, {len(tokenizer)} tokens) does not have as single tokens: "
                "model.text.template must match the LLM's tokenizer (model.text.tokenizer_path / model.llm.path)"
            )

    def segments(
        self,
        turns: Sequence[tuple[str, str]],
        tokenizer: PreTrainedTokenizerBase,
        add_generation_prompt: bool = False,
    ) -> list[tuple[str, bool]]:
        """``[(text, supervised)]`` for the conversation; with ``add_generation_prompt`` the turns end with a
        user turn and the result ends with the assistant header (the prompt to generate from)."""
        segs: list[tuple[str, bool]] = []
        system = self.default_system
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        if system is not None and self.system:
            segs.append((self.system.format(system=system), False))
        image_token = getattr(tokenizer, "image_token", "<image>")
        for i, (role, text) in enumerate(turns):
            if role == "user":
                if self.images_only_prompt:
                    text = image_token * text.count(image_token)
                segs.append((self.user.format(text=text), False))
            else:
                if self.last_answer_prefix and i == len(turns) - 1:
                    segs.append((self.last_answer_prefix, False))
                segs.append((text + self.answer_end, True))
                if self.after_answer:
                    segs.append((self.after_answer, False))
        if add_generation_prompt and (not turns or turns[-1][0] != "user"):
            raise TemplateError("a generation prompt must end with a user turn")
        prefix = self.last_answer_prefix if self.generation_prefix is None else self.generation_prefix
        if add_generation_prompt and prefix:
            segs.append((prefix, False))
        if self.end_with_eos and not add_generation_prompt and tokenizer.eos_token:
            segs.append((tokenizer.eos_token, False))
        return segs

    def render(self, segs: Sequence[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans that are supervised."""
        text, spans = "", []
        for piece, supervised in segs:
            if supervised:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    def tokenize(
        self,
        conversation: Sequence[Mapping],
        tokenizer: PreTrainedTokenizerBase,
        image_tokens: int,
        max_length: int | None = None,
        num_images: int | None = None,
    ) -> Tokenized:
        """Token ids and labels of a training conversation (which must end with an assistant answer).

        Each image placeholder becomes ``image_tokens`` copies of the placeholder id, all masked.
        ``num_images`` (when given) must equal the placeholder count. Over ``max_length`` the sample is
        truncated, unless that would cut an image or leave nothing supervised (then it raises)."""
        turns = normalize_conversation(conversation)
        if turns[-1][0] != "assistant":
            raise TemplateError("a training conversation must end with an assistant answer", "bad_roles")
        image_token = getattr(tokenizer, "image_token", "<image>")
        for role, text in turns:
            if role != "user" and image_token in text:
                raise TemplateError(
                    f"image placeholder {image_token} in the {role} turn", "placeholder_mismatch"
                )
        return self._encode(self.segments(turns, tokenizer), tokenizer, image_tokens, max_length, num_images)

    def prompt(
        self, conversation: Sequence[Mapping] | str, tokenizer: PreTrainedTokenizerBase, image_tokens: int
    ) -> Tokenized:
        """Ids of a generation prompt (a question string or turns ending with a user turn)."""
        if isinstance(conversation, str):
            conversation = [{"from": "human", "value": conversation}]
        turns = normalize_conversation(conversation)
        segs = self.segments(turns, tokenizer, add_generation_prompt=True)
        return self._encode(segs, tokenizer, image_tokens, None, None, require_supervision=False)

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids = [tokenizer.eos_token_id]
        if self.stop:
            stop = tokenizer(self.stop, add_special_tokens=False).input_ids
            if len(stop) == 1:
                ids.append(stop[0])
        return sorted(set(i for i in ids if i is not None))

    def _encode(
        self, segs, tokenizer, image_tokens, max_length, num_images, require_supervision=True
    ) -> Tokenized:
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("fvl needs a fast tokenizer (offset mappings find the supervised tokens)")
        text, spans = self.render(segs)
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        image_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "image_token", "<image>"))
        input_ids: list[int] = []
        labels: list[int] = []
        n_images = 0
        for tid, (start, end) in zip(enc.input_ids, enc.offset_mapping, strict=True):
            supervised = _supervised(text, start, end, spans, tokenizer, tid)
            if tid == image_id:
                if supervised:
                    raise TemplateError(
                        "image placeholder inside a supervised segment", "placeholder_mismatch"
                    )
                n_images += 1
                input_ids.extend([image_id] * image_tokens)
                labels.extend([IGNORE_INDEX] * image_tokens)
            else:
                input_ids.append(tid)
                labels.append(tid if supervised else IGNORE_INDEX)
        if num_images is not None and n_images != num_images:
            raise TemplateError(
                f"{n_images} image placeholders for {num_images} images", "placeholder_mismatch"
            )
        if max_length is not None and len(input_ids) > max_length:
            if image_id in input_ids[max_length:]:
                # An image's tokens must all stay or the placeholder count no longer matches the images.
                raise TemplateError(f"max_length={max_length} would cut image tokens", "too_long")
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if require_supervision and all(label == IGNORE_INDEX for label in labels):
            raise SupervisionError("no supervised token left (answers empty or truncated away)")
        return Tokenized(input_ids, labels, n_images)


def _supervised(
    text: str, start: int, end: int, spans: Sequence[tuple[int, int]], tokenizer, token_id: int
) -> bool:
    """Whether the token at characters ``start:end`` lies inside a supervised span. Whitespace at its edges
    does not count (chat tokens that strip the newline after them cover it); a zero-width token (BOS, a
    prepended ``▁``) belongs where it stands. One that covers both sides of a boundary raises."""
    piece = text[start:end]
    core_start = start + len(piece) - len(piece.lstrip())
    core_end = end - (len(piece) - len(piece.rstrip()))
    if core_end <= core_start:  # zero-width or whitespace only: where it starts
        return any(s <= start < e for s, e in spans) and start < len(text)
    for s, e in spans:
        if s <= core_start and core_end <= e:
            return True
        if core_start < e and core_end > s:
            raise TemplateError(
                f"token {tokenizer.convert_ids_to_tokens(token_id)!r} ({text[core_start:core_end]!r}) straddles "
                "the boundary of an answer: the template's text and the tokenizer's merges disagree",
                "token_straddles",
            )
    return False


TEMPLATES: Registry[ChatTemplate] = Registry("chat template")
_BUILT = {
    "plain": ChatTemplate(
        name="plain", default_system=None, system="", user="{text}",
        answer_end="\n", after_answer="", stop=None, images_only_prompt=True,
    ),
    "phi3": ChatTemplate(
        name="phi3", default_system="You are a helpful AI assistant.",
        system="<|system|>\n{system}<|end|>\n", user="<|user|>\n{text}<|end|>\n<|assistant|>\n",
        answer_end="<|end|>", after_answer="\n", stop="<|end|>", end_with_eos=True,
    ),
    "llama3": ChatTemplate(
        name="llama3",
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions."
        ),
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_end="<|eot_id|>", after_answer="", stop="<|eot_id|>",
    ),
    "chatml": ChatTemplate(
        name="chatml", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        system="<|im_start|>system\n{system}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        answer_end="<|im_end|>", after_answer="\n", stop="<|im_end|>",
    ),
    "qwen3": ChatTemplate(
        name="qwen3", default_system=None,
        system="<|im_start|>system\n{system}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        answer_end="<|im_end|>", after_answer="\n", stop="<|im_end|>", last_answer_prefix="<think>\n\n</think>\n\n",
    ),
    "qwen3_thinking": ChatTemplate(
        name="qwen3_thinking", default_system=None,
        system="<|im_start|>system\n{system}<|im_end|>\n", user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        answer_end="<|im_end|>", after_answer="\n", stop="<|im_end|>", last_answer_prefix="<think>\n\n</think>\n\n",
        generation_prefix="",
    ),
}  # fmt: skip
for _name, _template in _BUILT.items():
    TEMPLATES.register(_name)(lambda t=_template: t)


def get_template(name: str) -> ChatTemplate:
    return TEMPLATES.build(name)
