"""A plain (not editable) install carries its presets, stages, recipes and notebooks as package data: ``fvl``
runs from any directory, and a project's own ``experiments/`` still overrides the shipped files."""

import os
import subprocess
import sys

import pytest

from fvl.config import load
from tests.fixtures import REPO_ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` (no deps: they are this environment's) into a private target folder."""
    target = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO_ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return target


def run_installed(target, cwd, *code_lines):
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "\n".join(code_lines)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


@pytest.mark.e2e
def test_plain_install_runs_fvl_info_tiny_from_another_directory(installed, tmp_path):
    res = run_installed(
        installed, tmp_path,
        "import fvl, sys; from fvl.cli import main",
        f"assert fvl.__file__.startswith({str(installed)!r}), fvl.__file__",
        "sys.exit(main(['info', 'tiny', '--stage', 'finetune']))",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "16 LLM tokens/image" in res.stdout and "stage finetune" in res.stdout
    shipped = installed / "fvl"
    for path in ("experiments/pretrain.yaml", "experiments/stages/finetune.yaml", "experiments/sweeps/fusion.yaml",
                 "experiments/models/florence_vl_8b.yaml", "data_recipes/synthetic.yaml", "notebooks/features.ipynb"):  # fmt: skip
        assert (shipped / path).is_file(), path
    # experiments by name and by the README's relative paths resolve to the shipped copies
    res = run_installed(
        installed, tmp_path,
        "from fvl.config import load",
        "cfg = load('experiments/finetune.yaml'); assert cfg.stage.name == 'finetune'",
        "assert load('pretrain').model.text.template == 'plain'",
        "from fvl.data.recipes import load_recipe; assert load_recipe('synthetic').sources",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_projects_own_experiments_override_the_shipped_ones(tmp_path, monkeypatch):
    (tmp_path / "experiments" / "models").mkdir(parents=True)
    (tmp_path / "experiments" / "models" / "tiny.yaml").write_text(
        "include: [" + str(REPO_ROOT / "fvl" / "experiments" / "models" / "tiny.yaml") + "]\n"
        "model:\n  fusion:\n    name: avg_pool\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load("tiny").model.fusion.name == "avg_pool"
    assert load("pretrain").model.fusion.name == "dbfusion"  # the shipped experiment includes its own preset
