"""Random access into WebDataset tars: where each sample's members lie, so a reader can fetch sample ``i`` with
one seek and one read instead of streaming the shard.

A sample is the run of consecutive members that share a key (WebDataset's rule: the name up to the first dot
of its basename). Its span ``[start, end)`` runs from its first header (GNU/PAX long-name headers included) to
the end of its last member's padded data, so the bytes of a span are themselves a small tar. The builder
writes the spans beside each tar as ``<tar>.idx.npy`` (a structured array, loaded with
``allow_pickle=False``); a shard without one is scanned on load. Each entry also keeps what length grouping
needs without decoding: the characters of the conversation and the number of images.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

INDEX_SUFFIX = ".idx.npy"
BLOCK = 512
SPAN = np.dtype([("start", "<i8"), ("end", "<i8"), ("text_len", "<i4"), ("images", "<i2")])


def index_path(tar_path: str | Path) -> Path:
    return Path(f"{tar_path}{INDEX_SUFFIX}")


def _padded_end(member: tarfile.TarInfo) -> int:
    return member.offset_data + -(-member.size // BLOCK) * BLOCK


def _lengths(meta_bytes: bytes) -> tuple[int, int]:
    """(conversation characters, images) of a sample's ``json`` member; zeros when it does not parse (the
    reader will skip and count that sample)."""
    try:
        meta = json.loads(meta_bytes)
        text = sum(len(str(t.get("value", ""))) for t in meta.get("conversations", []) if isinstance(t, dict))
        return min(text, 2**31 - 1), min(len(meta.get("image_keys", [])), 2**15 - 1)
    except (ValueError, TypeError, AttributeError):
        return 0, 0


def scan(tar_path: str | Path) -> np.ndarray:
    """The spans of every complete sample of a tar. A damaged tar yields the samples before the damage: a
    header that does not parse ends the scan (tarfile's rule) and a member cut short by truncation is
    dropped, so the caller can count what is missing against the manifest."""
    size = os.path.getsize(tar_path)
    rows: list[tuple[int, int, int, int]] = []
    key = None
    start = end = text_len = images = 0
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = base_plus_ext(member.name)
                member_key = member_key or member.name
                if member_key != key:
                    if key is not None:
                        rows.append((start, end, text_len, images))
                    key, start, text_len, images = member_key, member.offset, 0, 0
                end = _padded_end(member)
                if ext == "json" and end <= size:
                    text_len, images = _lengths(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError):
        pass  # keep the samples read so far; the damaged rest counts as missing
    if key is not None:
        rows.append((start, end, text_len, images))
    spans = np.array(rows, dtype=SPAN)
    # A truncated file still lists its last member's header; its data is not all there.
    return spans[spans["end"] <= size] if len(spans) else spans


def write_index(tar_path: str | Path) -> Path:
    """Scan a finished tar and write its spans beside it (atomically); returns the sidecar's path."""
    target = index_path(tar_path)
    spans = scan(tar_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".npy", dir=target.parent)
    with os.fdopen(fd, "wb") as f:
        np.save(f, spans, allow_pickle=False)
    os.replace(tmp, target)
    return target


def load_index(tar_path: str | Path) -> np.ndarray:
    """The tar's spans: from its sidecar when that fits the tar, else by scanning it."""
    sidecar = index_path(tar_path)
    if sidecar.is_file():
        try:
            spans = np.load(sidecar, allow_pickle=False)
            if spans.dtype == SPAN and (not len(spans) or spans["end"][-1] <= os.path.getsize(tar_path)):
                return spans
        except (OSError, ValueError):
            pass  # unreadable or foreign sidecar: fall back to the scan
    return scan(tar_path)


def parse_sample(data: bytes) -> dict[str, bytes | str]:
    """The members of one sample's span (see ``scan``), as WebDataset gives them: ``__key__`` and one entry
    per extension. Raises ``tarfile.TarError`` (or ``ValueError``) when the bytes are damaged."""
    sample: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if sample.setdefault("__key__", key) != key:
                raise ValueError(f"a span holds two samples ({sample['__key__']}, {key})")
            sample[ext] = tar.extractfile(member).read()
    if "__key__" not in sample:
        raise tarfile.ReadError("no sample in span")
    return sample
