"""Guard rails of the layering: run folders have one owner, stage names live in stage definitions, and
evaluation does not depend on training."""

import re
import subprocess
import sys
from pathlib import Path

import fvl

PACKAGE = Path(fvl.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_no_path_arithmetic_on_run_folders_outside_the_owner():
    offenders = [p.name for p in SOURCES if ".parent.parent" in p.read_text() and p.name != "runs.py"]
    assert not offenders


def test_no_stage_name_compared_to_a_literal():
    stage_names = "|".join(p.stem for p in (PACKAGE / "experiments" / "stages").glob("*.yaml"))
    pattern = re.compile(rf"""(==|!=|\bin)\s*\(?["']({stage_names})["']""")
    offenders = [
        f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p in SOURCES for m in pattern.finditer(p.read_text())
    ]
    assert not offenders


def test_eval_imports_nothing_from_train():
    code = (
        "import sys, fvl.eval.evaluate, fvl.eval.align, fvl.eval.pca, fvl.eval.benchmarks, fvl.eval.metrics, "
        "fvl.eval.notebooks, fvl.eval.config; "
        "print(sorted(m for m in sys.modules if m.startswith('fvl.train')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
