"""Optional dependencies (the ``plots`` and ``notebooks`` extras): imported where used, with an error that
says which extra to install instead of a bare ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming ``pip install 'fvl[<extra>]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed: pip install 'fvl[{extra}]' (needed here: {e})") from e


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend."""
    require("matplotlib", "plots").use("Agg")
    return require("matplotlib.pyplot", "plots")
