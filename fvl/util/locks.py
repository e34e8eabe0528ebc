"""One lock mechanism for "one process builds a shared folder while the others wait": a file lock beside the
folder (``filelock``: works across processes, DDP ranks and sweep workers, and is released if the holder
dies). Used by the built-in towers (``fvl.assets.builtin``) and the feature cache's builds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: a hidden sibling, so the folder itself can be renamed into place."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def building(folder: str | Path, timeout: float = -1) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (waits for another holder; ``timeout`` seconds, -1: forever)."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout):
        yield
