"""Executes the comparison notebooks (``make notebooks``): each runs top to bottom in a fresh kernel and
its executed copy (with outputs) is written to ``outputs/notebooks/``; the files in ``notebooks/`` stay
without outputs. Parameters reach the notebooks through environment variables (``FVL_TRACKING_URI``,
``FVL_SWEEP``, ``FVL_CHECKPOINT``, ``FVL_OUT``), so the tests can point them at runs they create."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def execute(
    path: str | Path,
    out_dir: str | Path = "outputs/notebooks",
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> Path:
    """Run one notebook; returns the executed copy's path. Raises ``CellExecutionError`` on a failing cell."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(Path.cwd())}}
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / path.name
    nbformat.write(nb, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fvl.notebooks")
    parser.add_argument("notebooks", nargs="*", default=sorted(str(p) for p in NOTEBOOKS_DIR.glob("*.ipynb")))
    parser.add_argument("--out", default="outputs/notebooks")
    args = parser.parse_args()
    for nb in args.notebooks:
        print(f"executed {nb} -> {execute(nb, args.out)}")


if __name__ == "__main__":
    main()
