"""The processor: what turns conversations and images into model inputs, built from ``cfg.model`` alone.

It holds the LLM tokenizer (with the image placeholder), the chat template, the vision tower's image
transform and the number of LLM tokens per image. ``build_processor(cfg.model)`` makes one without building
the model (the tower class and the fusion class answer from the config), so the data side never needs the
model object; the model exposes the same thing as ``model.processor``, and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from fvl.data.collate import Sample
from fvl.models.config import ModelConfig
from fvl.models.fusion import FUSIONS
from fvl.models.llm import build_tokenizer
from fvl.models.vision import VISION_TOWERS
from fvl.models.vision.transform import ImageTransform
from fvl.text import ChatTemplate, get_template
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
        dim]`` a feature cache holds for them (``fvl.data.feature_cache``)."""
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


def image_tokens_for(cfg: ModelConfig, strict: bool = True) -> int | None:
    """LLM tokens per image for ``cfg``, from the tower's and the fusion's classes (nothing is built).
    ``strict=False`` (config validation) answers from ``model.vision.arch`` when a pretrained tower's folder
    cannot be read yet, and None when nothing tells."""
    from fvl.models.vision.builtin import is_built, is_builtin

    tower = VISION_TOWERS.get(cfg.vision.name)
    try:
        if not strict and is_builtin(cfg.vision.path) and not is_built(cfg.vision.path):
            raise FileNotFoundError("not built yet: validating a config must not build a tower for minutes")
        per_feature = tower.tokens_for(cfg.vision)
    except (OSError, ValueError, TypeError):
        if strict:
            raise
        try:  # building the tower will report what is wrong; here only the count matters
            per_feature = tower.tokens_for(dataclasses.replace(cfg.vision, init="random", path=None))
        except (OSError, ValueError, TypeError):
            return None
    return FUSIONS.get(cfg.fusion.name).tokens_for(len(cfg.fusion.features), per_feature)


def build_processor(cfg: ModelConfig, resize_mode: str = "pad") -> Processor:
    """The processor of a model config, without building the model."""
    tower = VISION_TOWERS.get(cfg.vision.name)
    return Processor(
        build_tokenizer(cfg.llm, cfg.text),
        get_template(cfg.text.template),
        tower.transform_for(cfg.vision, resize_mode),
        image_tokens_for(cfg),
        cfg.text.max_length,
        cfg.text.min_text_tokens,
    )
