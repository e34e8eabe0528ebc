"""``fvl checkpoints consolidate RUN|CKPT``: a sharded checkpoint (the folder an FSDP run writes for
``last.ckpt`` / ``best.ckpt``) made one safetensors file of the model, on one process, beside it.

A run that stopped before its end (killed, out of time) has only sharded folders; ``fvl eval``, ``fvl
export`` and ``init_from`` read those directly too, but a file is what other tools and other machines take.
"""

from __future__ import annotations

from pathlib import Path

from fvl.models.checkpoint import save_state
from fvl.models.loading import read_sharded_model_state
from fvl.runs.folder import RunDir


def sharded_checkpoint(spec: str | Path) -> Path:
    """The sharded ``.ckpt`` folder ``spec`` names: itself, or a run folder's ``best.ckpt`` (else ``last``)."""
    path = Path(spec)
    if path.is_dir() and path.suffix == ".ckpt":
        return path
    run = RunDir.of(path) if path.exists() else None
    if run is not None and path.is_dir():
        for kind in ("best", "last"):
            if run.ckpt(kind).is_dir():
                return run.ckpt(kind)
    raise FileNotFoundError(f"{spec}: neither a sharded .ckpt folder nor a run folder holding one")


def consolidate(spec: str | Path, out: str | Path | None = None) -> Path:
    """Write the model of the sharded checkpoint ``spec`` (a ``.ckpt`` folder or a run folder) as one
    safetensors file: ``out``, default the folder's name with ``.safetensors``. Returns its path."""
    folder = sharded_checkpoint(spec)
    run = RunDir.of(folder)
    if run is None:
        raise FileNotFoundError(f"{folder}: a sharded checkpoint needs its run folder's config.yaml")
    target = Path(out) if out else folder.with_suffix(".safetensors")
    return save_state(
        run.config().model, read_sharded_model_state(folder), target, consolidated_from=str(folder)
    )
