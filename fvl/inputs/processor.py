"""The processor: what turns conversations and images into model inputs (``Sample``), a plain picklable
object the data side and the models share. ``fvl.models.build_processor(cfg.model)`` makes the one of a model
config without building the model; the model exposes the same as ``model.processor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from fvl.inputs.collate import Sample
from fvl.inputs.transform import ImageTransform
from fvl.text import ChatTemplate
from fvl.text.templates import Tokenized

TOKENIZED_KEPT = 16384  # conversations a processor remembers tokenised (``Processor.tokenize``)
ImageSource = Image.Image | bytes  # an open image, or encoded bytes (decoded once, at the size needed)


@dataclass
class Processor:
    """Conversation + images -> ``Sample`` (token ids, exact labels, ``uint8`` image tensors); picklable for
    workers. The model normalises the images on its device (``FlorenceVL.encode_images``).

    tokenizer: the LLM tokenizer with ``image_token`` / ``image_token_id``.
    template: the chat template that builds ids and labels turn by turn.
    transform: encoded bytes or a PIL image -> ``uint8 [3, S, S]`` for the vision tower (its resize mode
        included), and the normalisation the model applies.
    image_tokens: LLM tokens per image after fusion (each placeholder expands to this many ids).
    max_length: longest tokenized sample (truncation keeps every image whole).
    min_text_tokens: the text budget a sample needs beside its images.
    """

    tokenizer: Any
    template: ChatTemplate
    transform: ImageTransform
    image_tokens: int
    max_length: int | None = None
    min_text_tokens: int = 0
    # Tokenised conversations by their text: templated data (the synthetic recipe's questions and answers)
    # repeats them, and tokenising is most of a cached-feature sample's cost in the loader (280 us of
    # about 300, measured on the desk sweep's finetune). Bounded; emptied when full. Not an init field, so
    # a processor made by ``dataclasses.replace`` (another max_length, say) starts with its own.
    _tokenized: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A template whose markers the tokenizer lacks would train on spelled-out markers: refuse it here,
        # before any data is read (the template's own TemplateError says which and why).
        self.template.check_tokenizer(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def max_images(self) -> int:
        """The most images a sample can hold and still fit ``max_length`` (0: no limit known)."""
        if not self.max_length:
            return 0
        return max(1, (self.max_length - self.min_text_tokens) // max(1, self.image_tokens))

    def with_resize_mode(self, mode: str) -> Processor:
        return dataclasses.replace(self, transform=self.transform.with_mode(mode))

    def __call__(
        self, conversations: list[dict], images: Sequence[ImageSource], sample_id: str = ""
    ) -> Sample:
        """Tokenise, then make each image (encoded bytes are decoded once, at the size needed). Raises
        ``TemplateError`` for a bad conversation and ``ImageError`` (``.reason``) for bad image bytes."""
        return self.with_images(conversations, [self.image(im, sample_id) for im in images], sample_id)

    def with_images(
        self, conversations: list[dict], images: Sequence[torch.Tensor], sample_id: str = ""
    ) -> Sample:
        """Tokenise around images already made: ``uint8 [3, S, S]`` tensors, or the fused features ``[tokens,
        dim]`` a feature cache holds for them (``fvl.data.feature_cache.store``)."""
        t = self.tokenize(conversations, len(images))
        return Sample(list(t.input_ids), list(t.labels), list(images), sample_id)

    def tokenize(self, conversations: list[dict], num_images: int) -> Tokenized:
        """The template's ``tokenize`` with this processor's settings, remembered by the conversation's
        text (callers copy the lists before changing them; ``with_images`` does)."""
        try:
            key = (tuple(tuple(sorted(turn.items())) for turn in conversations), num_images)
            hash(key)
        except (AttributeError, TypeError):  # not a list of flat turns: the template says what is wrong
            key = None
        found = self._tokenized.get(key) if key is not None else None
        if found is None:
            found = self.template.tokenize(
                conversations, self.tokenizer, self.image_tokens, self.max_length, num_images=num_images
            )
            if key is not None:
                if len(self._tokenized) >= TOKENIZED_KEPT:
                    self._tokenized.clear()
                self._tokenized[key] = found
        return found

    def image(self, image: ImageSource, where: str = "") -> torch.Tensor:
        """One image -> ``uint8 [3, S, S]``."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.transform.decode(bytes(image), where)
        return self.transform(image)
