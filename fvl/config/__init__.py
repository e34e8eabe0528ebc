"""Experiment configs: typed schemas, the YAML loader, and the checks between sections.

The bottom of fvl's layers above ``fvl.util``: importing it loads neither torch nor transformers, and
validating a config builds nothing and reads no checkpoint. ``load(path, overrides)`` gives the typed
``ExperimentConfig``; each section's schema lives in its own module (``model``, ``data``, ``train``,
``eval``, ``tracking``, ``stage``).
"""

from fvl.config.check import check
from fvl.config.experiment import (
    ConfigError,
    ExperimentConfig,
    derive,
    from_yaml,
    load,
    resolve_path,
    stage_path,
    to_dict,
    to_yaml,
    with_overrides,
    with_stage,
)
from fvl.config.typed import dump_yaml, parse_yaml, plain, read_yaml, typed

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "check",
    "derive",
    "from_yaml",
    "load",
    "resolve_path",
    "stage_path",
    "to_dict",
    "to_yaml",
    "with_overrides",
    "with_stage",
    "dump_yaml",
    "parse_yaml",
    "plain",
    "read_yaml",
    "typed",
]
