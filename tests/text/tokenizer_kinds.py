"""Offline-built tokenizers of the kinds the real presets use, for the template tests (no hub):

- ``metaspace_first``: SentencePiece-style Metaspace with ``prepend_scheme="first"`` and chat tokens that strip
  the whitespace after them (``rstrip=True``), a BOS added by the post-processor (Phi-3.5's current form);
- ``metaspace_legacy``: the older form whose normalizer prepends ``▁`` to every segment between special tokens;
- ``byte_level``: byte-level BPE with ``<|begin_of_text|>`` added by the post-processor (Llama 3);
- ``tiny``: the tiny preset's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from fvl.config.model import LLMConfig
from fvl.models.llm import llm_tokenizer_path
from fvl.text import load_tokenizer

CHAT = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
LLAMA = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "What colour is the circle? The circle is red. How many shapes are there? 3",
    "Describe the image. a red circle on a white background. You are a helpful AI assistant.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. Be brief. Same? no",
] * 50


def _wrap(tok: Tokenizer, bos: str, eos: str, add_bos: bool) -> PreTrainedTokenizerFast:
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)


def _specials(tok: Tokenizer, rstrip: bool) -> None:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip) for t in CHAT])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA])


def metaspace_first(out: Path):
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "<|endoftext|>"]
    alphabet = sorted(set("".join(CORPUS)) | {"▁", "\n"})
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))  # fmt: skip
    _specials(tok, rstrip=True)
    return _save(_wrap(tok, "<s>", "<|endoftext|>", add_bos=True), out)


def metaspace_legacy(out: Path):
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "<|endoftext|>"]
    alphabet = sorted(set("".join(CORPUS)) | {"▁", "\n"})
    corpus = ["▁" + line.replace(" ", "▁") for line in CORPUS]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))  # fmt: skip
    _specials(tok, rstrip=True)
    return _save(_wrap(tok, "<s>", "<|endoftext|>", add_bos=False), out)


def byte_level(out: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))  # fmt: skip
    _specials(tok, rstrip=False)
    return _save(_wrap(tok, "<|begin_of_text|>", "<|eot_id|>", add_bos=True), out)


def _save(fast: PreTrainedTokenizerFast, out: Path):
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def tiny(out: Path):
    return load_tokenizer(llm_tokenizer_path(None, LLMConfig()))


KINDS = {"metaspace_first": metaspace_first, "metaspace_legacy": metaspace_legacy, "byte_level": byte_level,
         "tiny": tiny}  # fmt: skip
