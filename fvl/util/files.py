"""Files written whole or not at all: a temporary file beside the target, renamed over it.

``tempfile.mkstemp`` makes its file 0600 whatever the umask; renamed into place it would stay private while
the tars beside it are 0644, so a shard folder or run shared between accounts becomes unreadable. Temporary
files made here get the mode a plain ``open`` would give (0666 less the umask)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: str | Path, suffix: str = "") -> Path:
    """An empty temporary file in ``path``'s folder (made if missing), named ``.{name}.*``, with the umask's
    mode: write it, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


@contextmanager
def replacing(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Write the yielded temporary file (``suffix``: for writers that pick a format by it); when the block
    ends it replaces ``path`` whole, and when the block raises it is removed and ``path`` is untouched."""
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` after this, or its old content if the process dies during it."""
    with replacing(path) as tmp:
        tmp.write_text(text)
