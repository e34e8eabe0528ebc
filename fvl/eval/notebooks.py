"""Executes the comparison notebooks (``fvl notebooks``, ``make notebooks``): each runs top to bottom in a
fresh kernel and its executed copy (with outputs) is written to ``outputs/notebooks/``; the shipped files
stay without outputs. Needs the ``notebooks`` extra (``pip install 'fvl[notebooks]'``). Parameters reach the notebooks through environment variables (``FVL_TRACKING_URI``,
``FVL_SWEEP``, ``FVL_CHECKPOINT``, ``FVL_OUT``), so the tests can point them at runs they create."""

from __future__ import annotations

import os
from pathlib import Path

from fvl.util import resources


def shipped_notebooks() -> list[Path]:
    """The notebooks that ship with fvl (the working directory's ``notebooks/`` first)."""
    return [
        resources.find("notebooks", f"{name}.ipynb") for name in resources.names("notebooks", suffix=".ipynb")
    ]


def execute(
    path: str | Path,
    out_dir: str | Path = "outputs/notebooks",
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> Path:
    """Run one notebook; returns the executed copy's path. Raises ``CellExecutionError`` on a failing cell."""
    from fvl.util.extras import require

    nbformat = require("nbformat", "notebooks")
    NotebookClient = require("nbclient", "notebooks").NotebookClient

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
