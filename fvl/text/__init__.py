"""Text side: the tokenizer with fvl's image placeholder, and chat templates that build exact label masks."""

from fvl.text.templates import (
    TEMPLATES,
    ChatTemplate,
    SupervisionError,
    TemplateError,
    Tokenized,
    get_template,
    normalize_conversation,
)
from fvl.text.tokenizer import load_tokenizer

__all__ = [
    "TEMPLATES",
    "ChatTemplate",
    "SupervisionError",
    "TemplateError",
    "Tokenized",
    "get_template",
    "load_tokenizer",
    "normalize_conversation",
]
