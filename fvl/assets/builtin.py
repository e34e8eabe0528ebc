"""Towers that fvl builds itself: ``model.vision.path=builtin:NAME`` names one, built on first use into the
cache (``$FVL_CACHE``, default ``~/.cache/fvl``) and from then on loaded from there as any local pretrained
folder is. ``builtin:florence2-tiny``: the tiny Florence-2 trained on its own tasks (``fvl florence2-tiny``).

A build is keyed by everything that decides its weights, so a changed recipe builds anew; concurrent
processes (DDP ranks, parallel sweep runs) wait for one build under a file lock. A folder is complete once it
exists: it is built under a temporary name and renamed into place.

``builtin:qwen-tiny-tokenizer``: a tokenizer of the Qwen family's form, trained offline on the tiny corpus
(``fvl.assets.tiny_tokenizers.train_qwen_style``), for ``model.text.tokenizer_path``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fvl.util.locks import building
from fvl.util.registry import Registry

PREFIX = "builtin:"

# name -> (key of what decides the weights, a function that builds the folder at the given path)
BUILTINS: Registry[tuple[dict, Callable[[Path], None]]] = Registry("built-in model")


@BUILTINS.register("florence2-tiny")
def _florence2_tiny() -> tuple[dict, Callable[[Path], None]]:
    from fvl.assets.florence2_tiny.build import Florence2TinyConfig, build

    cfg = Florence2TinyConfig()
    return cfg.key(), lambda out: build(cfg, out, progress=sys.stderr.isatty())


@BUILTINS.register("qwen-tiny-tokenizer")
def _qwen_tiny_tokenizer() -> tuple[dict, Callable[[Path], None]]:
    from fvl.assets.tiny_tokenizers import QWEN_ADDED, QWEN_SPECIALS, QWEN_SPLIT, VERSION, train_qwen_style

    key = {
        "version": VERSION,
        "normalizer": "NFC",
        "split": QWEN_SPLIT,
        "specials": QWEN_SPECIALS,
        "added": QWEN_ADDED,
    }
    return key, train_qwen_style


def builtin_folder(name: str) -> Path:
    """Where ``builtin:NAME`` lives in the cache (whether built yet or not)."""
    from fvl.assets.tiny_tokenizers import cache_root

    return cache_root() / f"{name}-{_digest(name)}"


@functools.cache
def _digest(name: str) -> str:
    """What decides ``builtin:NAME``'s weights, hashed. Remembered per process: it comes from the shipped code
    and configs, and computing it loads a preset (which every config load naming the tower would redo)."""
    key, _ = BUILTINS.build(name)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def is_builtin(path: str | None) -> bool:
    return bool(path) and str(path).startswith(PREFIX)


def is_built(path: str | None) -> bool:
    """Whether a ``builtin:NAME`` path's folder exists already (building it takes minutes)."""
    return is_builtin(path) and builtin_folder(str(path)[len(PREFIX) :]).is_dir()


def resolve(path: str | None) -> str | None:
    """A ``builtin:NAME`` path -> its cached folder (built now if absent); any other path unchanged."""
    if not is_builtin(path):
        return path
    name = str(path)[len(PREFIX) :]
    folder = builtin_folder(name)
    if folder.is_dir():
        return str(folder)
    with building(folder):  # one process builds; the others find its folder
        if not folder.is_dir():
            print(f"building {path} once into {folder} (the first use only)...", file=sys.stderr, flush=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                BUILTINS.build(name)[1](tmp)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
