"""Reading a checkpoint folder without running any code it ships: ``config.json`` as plain JSON and the
weights as tensors (safetensors, or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers only). Sharded checkpoints are read through their index file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# Tokenizer files a Hugging Face folder may hold (vocabularies, merges, settings); never code.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def require_dir(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder ({what})")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: one file or the shards its index lists (safetensors first)."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index} lists shards that are absent: {missing}")
            return [folder / s for s in shards]
    return []


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weights (see ``weight_files``), on the CPU."""
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(
            f"{folder}: no weights (model.safetensors, pytorch_model.bin or a sharded index of either)"
        )
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            part = load_file(str(path), device="cpu")
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise ValueError(f"{path}: not a state dict of tensors")
        twice = sorted(set(part) & set(out))
        if twice:
            raise ValueError(f"{folder}: tensors in more than one shard: {twice[:20]}")
        out.update(part)
    return out


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy a folder's tokenizer files (no ``config.json``, no code) into ``out``; the names copied."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return copied


def without_auto_map(path: Path, out: Path) -> None:
    """Copy a JSON settings file with its ``auto_map`` (pointers to remote code) removed."""
    data = json.loads(path.read_text())
    data.pop("auto_map", None)
    out.write_text(json.dumps(data, indent=2) + "\n")
