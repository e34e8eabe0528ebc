"""The YAML files and notebooks that ship inside the package, found by name.

Experiments (presets, stages, fusion variants, sweeps), data recipes and notebooks are package data
(``fvl/experiments``, ``fvl/data_recipes``, ``fvl/notebooks``), read through ``importlib.resources`` so that a
plain ``pip install`` runs ``fvl info tiny`` or ``fvl train pretrain`` from any directory. A project's own
folder of the same name in the working directory comes first: ``./experiments/models/tiny.yaml`` overrides
the shipped preset, ``./data_recipes/mine.yaml`` adds a recipe.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

KINDS = ("experiments", "data_recipes", "notebooks")


def shipped_dir(kind: str) -> Path:
    """The package's own folder of ``kind`` (a real directory: pip installs packages unzipped)."""
    if kind not in KINDS:
        raise ValueError(f"unknown resource kind {kind!r}; known: {', '.join(KINDS)}")
    return Path(str(files("fvl") / kind))


def search_dirs(kind: str) -> list[Path]:
    """Where names of ``kind`` are looked up, in order: the working directory's folder, then the package's.
    (In a checkout the top-level folders are links to the package's; found through the link, relative
    paths inside a recipe keep resolving against the checkout.)"""
    local = Path.cwd() / kind
    shipped = shipped_dir(kind)
    if not local.is_dir():
        return [shipped]
    return [local] if local.resolve() == shipped.resolve() else [local, shipped]


def find(kind: str, relative: str | Path) -> Path | None:
    """The first existing ``<dir>/relative`` over ``search_dirs(kind)``, else None."""
    for folder in search_dirs(kind):
        candidate = folder / relative
        if candidate.is_file():
            return candidate
    return None


def names(kind: str, subdir: str = "", suffix: str = ".yaml") -> list[str]:
    """Names (file stems) available under ``kind/subdir`` in any search folder, sorted."""
    found = set()
    for folder in search_dirs(kind):
        found |= {p.stem for p in (folder / subdir).glob(f"*{suffix}")}
    return sorted(found)
