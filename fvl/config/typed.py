"""Typed configs from YAML and mappings: the one place where OmegaConf merges, type-checks and writes them.

Every schema in fvl is a dataclass that checks its own fields (``__post_init__``). ``typed(Schema, *layers)``
merges layers onto its defaults (an unknown key or a wrong type fails with the key's full name) and returns
the instance; ``read_yaml`` and ``dump_yaml`` read and write plain containers. Other packages call these
instead of importing OmegaConf themselves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key and its source."""


def _node(layer: Any) -> Any:
    if isinstance(layer, str):
        return OmegaConf.create(layer)
    if dataclasses.is_dataclass(layer) and not isinstance(layer, type):
        return OmegaConf.structured(layer)
    return layer


def typed(schema: type[T], *layers: Any, source: str = "config", prefix: str = "") -> T:
    """An instance of ``schema``: its defaults <- ``layers`` in order (instances, mappings or YAML text), then
    the schema's own checks. ConfigError names ``source`` and the key (after ``prefix``: ``sources[0].``)."""
    try:
        merged = OmegaConf.structured(schema)
        for layer in layers:
            if layer is not None:
                merged = OmegaConf.merge(merged, _node(layer))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        where = f"{prefix}{key}" if prefix else f"key {key!r}"
        raise ConfigError(f"{source}: {where}: {getattr(e, 'msg', e)}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix}{e}") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain dicts and lists; ConfigError (with the line) when it does not parse."""
    try:
        return plain(OmegaConf.load(path))
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None


def parse_yaml(text: str, source: str = "YAML") -> Any:
    """YAML text as plain dicts and lists."""
    try:
        return plain(OmegaConf.create(text))
    except Exception as e:
        raise ConfigError(f"{source}: cannot parse YAML: {e}") from None


def plain(value: Any) -> Any:
    """A config (an OmegaConf node, a dataclass instance or containers of them) as plain dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return OmegaConf.to_container(OmegaConf.structured(value), resolve=True)
    return value


def dump_yaml(value: Any) -> str:
    """A dataclass instance or plain containers as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(plain(value)))
