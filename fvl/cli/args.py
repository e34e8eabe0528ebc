"""Typed subcommand arguments: a dataclass declares a subcommand's arguments and generates its parser.

Each ``fvl`` subcommand is a typed function of one argument dataclass. The dataclass is the single
source of truth: field types and defaults give the options, its docstring (a description paragraph, then
``name: text`` lines) gives the help, and its ``__post_init__`` validates the values. This is the idea of
litgpt's CLI without a dependency beyond the standard library.

Supported field types: ``str``, ``int``, ``float``, ``bool`` (a flag), ``X | None``, ``list[X]`` and
nested dataclasses (flattened into the same parser). ``field(metadata=...)`` keys: ``short`` (an alias
such as ``"-v"``), ``positional`` (an argument instead of an option), ``repeat`` (a list option given
once per value: ``--bench a --bench b``), ``choices``, and ``cli: False`` (a field that only config files
set: no option, its default kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")
POSITIONAL = {"positional": True}  # a field's ``metadata``: the argument is positional
_SCALARS: tuple[type, ...] = (str, int, float)
_ENTRY = re.compile(r"(\s*)([A-Za-z_]\w*(?:\s*/\s*[A-Za-z_]\w*)*)\s*:(?=\s|$)(.*)")
_MISSING: Any = dataclasses.MISSING


def _clean(text: str) -> str:
    """One line of help: whitespace collapsed, ``x`` -> x."""
    return re.sub(r"``(.+?)``", r"\1", " ".join(text.split()))


def _doc_lines(cls: type) -> list[str]:
    doc = cls.__dict__.get("__doc__") or ""
    if re.fullmatch(rf"{re.escape(cls.__name__)}\(.*\)", doc, re.S):  # @dataclass's stand-in docstring
        return []
    return inspect.cleandoc(doc).splitlines()


def description(cls: type) -> str:
    lines = _doc_lines(cls)
    end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    return _clean(" ".join(lines[:end]))


def field_docs(cls: type) -> dict[str, str]:
    """Help text per field from the lines after the docstring's first paragraph: ``name: text`` (or
    ``a / b: text`` for several fields), continued by lines indented more deeply; a blank line ends an entry."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    lines = _doc_lines(cls)
    start = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    docs: dict[str, str] = {}
    names: list[str] = []
    indent, text = 0, []
    for line in [*lines[start:], ""]:
        depth = len(line) - len(line.lstrip())
        if text and line.strip() and depth > indent:
            text.append(line)
            continue
        docs.update(dict.fromkeys(names, _clean(" ".join(text))))
        names, text = [], []
        if m := _ENTRY.fullmatch(line):
            names = [n.strip() for n in m[2].split("/") if fields is None or n.strip() in fields]
            indent, text = len(m[1]), [m[3]]
    return docs


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not _MISSING else _MISSING


class _Repeat(argparse.Action):
    """``--x a --x b`` gives ``[a, b]``: the first use replaces the default list instead of appending to it
    (argparse's own ``append`` would give ``default + [a, b]``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, [*items, values])


def _argument(
    f: dataclasses.Field[Any], hint: Any, default: Any, doc: str | None, where: str
) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` names and keywords of one (leaf) field."""
    meta, given = f.metadata, hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:  # X | None
            hint = args[0]
        default = None if default is _MISSING else default
    is_list = typing.get_origin(hint) is list
    elem = typing.get_args(hint)[0] if is_list and len(typing.get_args(hint)) == 1 else hint
    positional = bool(meta.get("positional"))
    is_flag = given is bool and not positional
    if elem not in _SCALARS and not is_flag:
        shown = f.type if isinstance(f.type, str) else getattr(given, "__name__", str(given))
        kind = "positional " if positional else ""
        raise TypeError(f"{where}: unsupported {kind}field type {shown!r}")
    kw: dict[str, Any] = {}
    if meta.get("choices") is not None:
        kw["choices"] = tuple(meta["choices"])
    dashed = f.name.replace("_", "-")
    if is_flag:
        on = default is True
        names = [f"--no-{dashed}" if on else f"--{dashed}"]
        kw.update(dest=f.name, action="store_false" if on else "store_true", default=on)
    else:
        kw["type"] = elem
        if default is not _MISSING:
            kw["default"] = default
        if positional:
            names = [f.name]
            if is_list:
                kw["nargs"] = "+" if default is _MISSING else "*"
            elif default is not _MISSING:
                kw["nargs"] = "?"
        else:
            names = [f"--{dashed}"]
            kw.update(dest=f.name, required=default is _MISSING)
            if is_list and meta.get("repeat"):
                kw["action"] = _Repeat
            elif is_list:
                kw["nargs"] = "+"
    if meta.get("short") and not positional:
        names.insert(0, meta["short"])
    note = ""
    if not is_flag and default is not _MISSING and default is not None and default != []:
        note = f"(default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
    kw["help"] = " ".join(p for p in (doc, note) if p).replace("%", "%%") or None
    return names, kw


def _add_fields(
    parser: argparse.ArgumentParser, cls: type, base: Any, path: str, seen: dict[str, str]
) -> None:
    """Add the fields of ``cls`` (defaults from the instance ``base`` when given), flattening nested ones."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        where, hint = f"{path}.{f.name}", hints[f.name]
        default = getattr(base, f.name) if base is not None else _default(f)
        if _is_dataclass_type(hint):
            _add_fields(parser, hint, None if default is _MISSING else default, where, seen)
            continue
        if f.name in seen:
            raise ValueError(f"flattened fields collide: {seen[f.name]} and {where} are both --{f.name}")
        seen[f.name] = where
        names, kw = _argument(f, hint, default, docs.get(f.name), where)
        parser.add_argument(*names, **kw)


def build_parser(cls: type, prog: str) -> argparse.ArgumentParser:
    """An argparse parser for the dataclass ``cls``: one option (or positional) per field, nested
    dataclasses flattened, help from the docstrings. Raises TypeError/ValueError for a bad dataclass."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    parser = argparse.ArgumentParser(prog=prog, description=description(cls) or None)
    _add_fields(parser, cls, None, cls.__name__, {})
    return parser


def _rebuild(cls: type[T], ns: argparse.Namespace) -> T:
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.init and f.metadata.get("cli") is not False:
            hint = hints[f.name]
            value = _rebuild(hint, ns) if _is_dataclass_type(hint) else getattr(ns, f.name)
            values[f.name] = list(value) if isinstance(value, list) else value  # never share a default
    return cls(**values)


def parse(cls: type[T], argv: Sequence[str], prog: str) -> T:
    """Parse ``argv`` (positionals may follow options) into an instance of ``cls``; a ValueError or
    TypeError from its ``__post_init__`` becomes a usage error (exit status 2)."""
    parser = build_parser(cls, prog)
    ns = parser.parse_intermixed_args(list(argv))
    try:
        return _rebuild(cls, ns)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
