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
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from fvl.util.files import replacing

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
    with replacing(target, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, spans, allow_pickle=False)
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
    per extension. Raises ``tarfile.TarError`` (or ``ValueError``) when the bytes are damaged.

    The common layout (ustar headers, optionally PAX or GNU long-name headers before a member) is read by
    ``_plain_members`` at about a tenth of ``tarfile``'s cost, which the data loader feels: two spans per
    sample with a feature cache. Anything it does not read goes through ``tarfile``, which then decides."""
    try:
        members = _plain_members(data)
    except _NotPlain:
        members = _tarfile_members(data)
    sample: dict[str, bytes | str] = {}
    for name, payload in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if sample.setdefault("__key__", key) != key:
            raise ValueError(f"a span holds two samples ({sample['__key__']}, {key})")
        sample[ext] = payload
    if "__key__" not in sample:
        raise tarfile.ReadError("no sample in span")
    return sample


class _NotPlain(Exception):
    """A span ``_plain_members`` leaves to ``tarfile``."""


_FILE_TYPES = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    digits = field.rstrip(b" \0").strip()
    if not digits or field[0] & 0x80:  # empty, or base-256 (sizes past 8 GiB): tarfile's business
        raise _NotPlain
    return int(digits, 8)


def _plain_members(data: bytes) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular files of a tar held in ``data``; raises ``_NotPlain`` at anything
    unusual (a bad checksum, a truncated member, an unknown header type), for ``tarfile`` to judge."""
    out: list[tuple[str, bytes]] = []
    pos, end = 0, len(data)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while pos + BLOCK <= end:
        header = data[pos : pos + BLOCK]
        if not header.strip(b"\0"):
            break  # the end-of-archive blocks
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as spaces
            raise _NotPlain
        size, kind = _octal(header[124:136]), header[156:157]
        body = pos + BLOCK
        if kind == b"x":
            pax = _pax_records(data[body : body + size])
        if "size" in pax and kind in _FILE_TYPES:
            size = int(pax["size"])
        if body + size > end:
            raise _NotPlain  # cut short
        if kind == b"L":
            long_name = data[body : body + size].rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in _FILE_TYPES:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            plain = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            out.append((pax.get("path") or long_name or plain, data[body : body + size]))
            long_name, pax = None, {}
        elif kind not in (b"x", b"g", b"5"):
            raise _NotPlain  # links, devices, sparse files: tarfile's rules apply
        pos = body + -(-size // BLOCK) * BLOCK
    return out


def _pax_records(block: bytes) -> dict[str, str]:
    """A PAX extended header's ``length key=value\\n`` records."""
    records: dict[str, str] = {}
    at = 0
    while at < len(block) and block[at : at + 1] not in (b"", b"\0"):
        space = block.find(b" ", at)
        if space < 0:
            raise _NotPlain
        length = int(block[at:space])
        if length <= 0:
            raise _NotPlain
        key, _, value = block[space + 1 : at + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        at += length
    return records


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
