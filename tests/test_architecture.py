"""The layering contract of the whole package: every import between fvl's modules (top-level or inside a
function; ``if TYPE_CHECKING:`` blocks aside, they never run) goes down the layers below or stays inside one
package, and no modules import each other in a circle. Entry points (``__main__`` modules) may import the CLI.

Layers, bottom to top; packages on one line are siblings and import none of each other:
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fvl

PACKAGE = Path(fvl.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

LAYERS: list[set[str]] = [
    {"util"},  # registry, resources, extras, threads, locks
    {"config"},  # typed schemas, the YAML loader, cross-section checks
    {"runs", "text", "synthetic"},  # run folders + MLflow store; chat templates; the synthetic world
    {"inputs"},  # Sample/collate, image transform, Processor
    {"assets"},  # built once under a lock: tiny tokenizers, builtin towers, stage 0
    {"models"},
    {"data"},
    {"eval"},  # benchmarks, scoring, analysis: what training runs evaluate with
    {"train", "convert"},
    {"sweep", "bench", "integrations"},
    {"cli"},
]
__doc__ += "\n".join("  " + ", ".join(sorted(layer)) for layer in LAYERS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SOURCES}


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path) -> set[str]:
    """The fvl modules that ``path`` imports at run time."""
    return imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def imports_in(text: str, me: str, is_package: bool = False) -> set[str]:
    """The fvl modules that module ``me`` (its source ``text``) imports at run time."""
    tree = ast.parse(text)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        ):
            skipped |= {id(n) for n in ast.walk(node)}
    package = me if is_package else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names if a.name.startswith("fvl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("fvl"):
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    found.add(full if full in MODULES else _resolve(module))
    found.discard(me)
    found.discard("")
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_every_package_has_a_layer():
    packages = {_package(m) for m in MODULES} - {"", "__main__", "notebooks", "experiments", "data_recipes"}
    assert packages == set().union(*LAYERS), "add the new package to LAYERS (and the README's tree)"


def test_no_import_goes_up_or_sideways_between_packages():
    offenders = []
    for module, targets in GRAPH.items():
        source = _package(module)
        if not source or module.endswith("__main__"):
            continue  # fvl/__init__ and the entry points
        for target in targets:
            dest = _package(target)
            if dest and dest != source and _layer(dest) >= _layer(source):
                offenders.append(f"{module} -> {target}")
    assert not offenders, "\n".join(sorted(offenders))


def test_no_import_circle_between_modules():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = iter(range(10**6))

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles


def test_the_contract_sees_lazy_and_relative_imports_but_not_type_checking_ones():
    text = (
        "from typing import TYPE_CHECKING\n"
        "from . import store\n"
        "if TYPE_CHECKING:\n    from fvl.sweep.runner import Sweep\n"
        "def f():\n    from fvl.train.run import train\n"
    )
    found = imports_in(text, "fvl.data.feature_cache.build")
    assert found == {"fvl.train.run", "fvl.data.feature_cache.store"}


def test_no_path_arithmetic_on_run_folders_outside_the_owner():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in SOURCES
        if ".parent.parent" in p.read_text() and p.parent.name != "runs"
    ]
    assert not offenders


def test_no_stage_name_compared_to_a_literal():
    stage_names = "|".join(p.stem for p in (PACKAGE / "experiments" / "stages").glob("*.yaml"))
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({stage_names})["']""")
    offenders = [
        f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p in SOURCES for m in pattern.finditer(p.read_text())
    ]
    assert not offenders


def test_omegaconf_stays_inside_the_config_package():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in SOURCES
        if re.search(r"^\s*(from|import) omegaconf", p.read_text(), re.M) and p.parent.name != "config"
    ]
    assert not offenders


def modules_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.split()


@pytest.mark.e2e
def test_eval_imports_nothing_from_train():
    loaded = modules_after(
        "import fvl.eval.evaluate, fvl.eval.align, fvl.eval.pca, fvl.eval.benchmarks, fvl.eval.metrics, "
        "fvl.eval.notebooks, fvl.config.eval"
    )
    assert [m for m in loaded if m.startswith("fvl.train")] == []


@pytest.mark.e2e
def test_loading_a_config_imports_neither_torch_nor_transformers_nor_model_code():
    loaded = modules_after("import fvl.config as c; c.to_yaml(c.load('florence_vl_3b', ['stage=finetune']))")
    assert {m.split(".")[0] for m in loaded} & {"torch", "transformers", "lightning"} == set()
    assert [m for m in loaded if m.startswith("fvl.") and not m.startswith(("fvl.config", "fvl.util"))] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    """A name moved or removed fails here, in the unit tier, not first in a subprocess of the e2e tier."""
    importlib.import_module(module)
