"""Offline tokenizers for the ``tiny`` presets, trained deterministically on first use and cached.

No hub access is possible (or wanted) in tests: the tiny LLM and tiny Florence-2 get byte-level BPE
tokenizers trained here on a fixed generated corpus, so any text encodes (bytes fallback) and the same
files come out every time. They are written to ``$FVL_CACHE/tiny-v{VERSION}`` (default ``~/.cache/fvl``).

``train_qwen_style`` builds one of the Qwen family's form (``builtin:qwen-tiny-tokenizer``, the
``tiny_qwen3`` preset's): NFC normalisation and Qwen2's pre-tokenizer regex (single digits, contractions) before byte-level BPE, the
ChatML markers ``<|im_start|>`` / ``<|im_end|>`` and ``<|endoftext|>`` as special tokens, ``<think>`` /
``</think>`` as ordinary added tokens, no BOS, ``<|im_end|>`` as EOS and ``<|endoftext|>`` as padding - what
Qwen2.5-Instruct and Qwen3 tokenizers have, with a vocabulary of a thousand instead of 151 thousand.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile
from pathlib import Path

VERSION = 1
LLM_SPECIALS = [
    "<pad>", "<s>", "<|endoftext|>",
    # phi3 chat template
    "<|system|>", "<|end|>", "<|user|>", "<|assistant|>",
    # llama3 chat template
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip
FLORENCE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

_WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "of",
    "in",
    "on",
    "to",
    "what",
    "which",
    "how",
    "many",
    "there",
    "image",
    "picture",
    "color",
    "colour",
    "shape",
    "text",
    "value",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "gray",
    "circle",
    "square",
    "triangle",
    "star",
    "left",
    "right",
    "top",
    "bottom",
    "above",
    "below",
    "next",
    "yes",
    "no",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "bar",
    "chart",
    "label",
    "describe",
    "detail",
    "shown",
    "locate",
    "objects",
    "with",
    "their",
    "descriptions",
    "question",
    "answer",
    "assistant",
    "user",
    "system",
    "helpful",
    "you",
    "are",
    "a",
    "helpful",
    "ai",
    "assistant",
    "chat",
    "between",
    "curious",
    "and",
    "artificial",
    "intelligence",
    "gives",
    "detailed",
    "polite",
    "answers",
    "the",
    "user's",
    "questions",
    "word",
    "single",
    "phrase",
    "using",
    "cat",
    "dog",
    "sun",
    "car",
    "tree",
    "box",
    "map",
    "pen",
    "cup",
    "hat",
]
_PROMPTS = [
    "Describe in detail what is shown in the image.",
    "What is the text in the image?",
    "Locate the objects in the image, with their descriptions.",
    "You are a helpful AI assistant.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "Answer the question using a single word or phrase.",
]


def _corpus(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = list(_PROMPTS) * 20
    for _ in range(n):
        lines.append(
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "?", ""])
        )
    lines += [str(i) for i in range(1000)]
    lines += ["".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)]
    return lines


def _bpe(vocab_size: int, specials: list[str], pre_tokenizer=None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the tiny corpus (``pre_tokenizer``: what splits
    the text before the bytes; default: byte-level's own split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _train(
    vocab_size: int, specials: list[str], bos: str, eos: str, pad: str, unk: str | None, out: Path
) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(vocab_size, specials)
    extra = {"unk_token": unk} if unk else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, **extra)
    fast.save_pretrained(str(out))


# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letters with one leading non-letter, single
# digits, punctuation runs, newlines, other whitespace.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>"]  # ordinary added tokens in Qwen3's tokenizer (not special)


def train_qwen_style(out: Path, vocab_size: int = 1024) -> None:
    """Write a Qwen-form tokenizer (see the module docstring) trained on the tiny corpus to ``out``."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = _bpe(vocab_size, QWEN_SPECIALS, split)
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(str(out))


def cache_root() -> Path:
    return Path(os.environ.get("FVL_CACHE", Path.home() / ".cache" / "fvl"))


def tiny_tokenizer_dirs() -> tuple[Path, Path]:
    """``(llm_tokenizer_dir, florence_tokenizer_dir)``, built on first use (atomically: temp dir + rename)."""
    root = cache_root() / f"tiny-v{VERSION}"
    llm_dir, flo_dir = root / "llm_tokenizer", root / "florence_tokenizer"
    if not (llm_dir / "tokenizer.json").exists() or not (flo_dir / "tokenizer.json").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
        _train(1024, LLM_SPECIALS, "<s>", "<|endoftext|>", "<pad>", None, tmp / "llm_tokenizer")
        _train(512, FLORENCE_SPECIALS, "<s>", "</s>", "<pad>", "<unk>", tmp / "florence_tokenizer")
        try:
            tmp.rename(root)
        except OSError:  # another process won the race; its files are identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return llm_dir, flo_dir
