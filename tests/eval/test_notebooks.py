"""Both notebooks execute top to bottom against runs created here: the shipped desk-scale fusion sweep on a
reduced grid (its own stages, two grid points side by side, one shared feature cache per stage, scores),
after an older smoke launch of the same sweep name."""

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from fvl.config import load
from fvl.eval.notebooks import execute
from fvl.models import build_model
from fvl.sweep.runner import load_sweep, report, run_sweep
from fvl.util.resources import shipped_dir
from tests.fixtures import EXPERIMENTS, synthetic_recipe

NOTEBOOKS_DIR = shipped_dir("notebooks")


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    synthetic_recipe(root / "recipe.yaml", captions=64, qa=64, per_shard=32)
    exp = EXPERIMENTS
    torch.manual_seed(0)  # a tiny tower saved as a folder stands in for stage 0's (model.vision.path)
    build_model(load("pretrain").model).vision.save_pretrained(root / "tower")
    desk = exp / "sweeps" / "desk"
    sweep = root / "sweep.yaml"
    variants = ", ".join(str(exp / "fusion" / f"{v}.yaml") for v in ("dbfusion", "minus_ocr"))
    sweep.write_text(
        f"sweep: nbtest\nstages: [{desk / 'pretrain.yaml'}, {desk / 'finetune.yaml'}]\nparallel: 2\n"
        "notebook: compare_fusion\n"
        f"overrides: [model.vision.path={root / 'tower'}, trainer.max_steps=2, data.batch_size=8, "
        "train.global_batch_size=8, trainer.progress=false, trainer.cpu_threads=1, data.num_workers=0, "
        "eval.during_training.every_n_steps=1, eval.during_training.limit=14]\n"
        "eval: {samples: 14}\n"
        f"grid:\n  fusion: [{variants}]\n  seed: [0, 1]\n"
    )
    # an older launch under the same sweep name (a smoke run with other overrides): the notebook leaves it out
    smoke = root / "smoke.yaml"
    smoke.write_text(
        f"sweep: nbtest\nstages: [{exp / 'pretrain.yaml'}]\n"
        "overrides: [trainer.max_steps=1, data.val_samples=0, data.batch_size=8, train.global_batch_size=8, trainer.progress=false]\n"
        f"grid:\n  fusion: [{exp / 'fusion' / 'avg_pool.yaml'}]\n  seed: [5]\n"
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = [f"data.recipe={root / 'recipe.yaml'}", f"data.shards={root / 'shards'}",
              f"output_dir={root / 'runs'}", f"tracking.uri={uri}", "data.num_workers=0"]  # fmt: skip
    older = run_sweep(smoke, common)
    runs = run_sweep(sweep, common)
    assert [r.status for r in older] == ["ok"] and [r.status for r in runs] == ["ok"] * 8, [
        r.error for r in runs
    ]
    assert all(r.scores for r in runs if r.stage == "finetune")
    assert older[0].sweep_id != runs[0].sweep_id and len({r.sweep_id for r in runs}) == 1
    # one feature cache per stage (captions squared, questions padded) served all 8 runs
    caches = sorted(p for p in (root / "runs" / "feature_cache").iterdir() if p.is_dir())
    assert len(caches) == 2
    client = MlflowClient(uri)
    params = {client.get_run(r.result.mlflow_run_id).data.params["data.feature_cache"] for r in runs}
    assert params == {str(c) for c in caches}, params
    return {"root": root, "uri": uri, "runs": runs, "older": older, "sweep": sweep, "overrides": common}


def printed(path) -> str:
    """Everything an executed notebook's cells printed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.e2e
def test_compare_fusion_notebook_runs_on_a_sweep(sweep_store, tmp_path):
    # what `fvl sweep` does at the end of a sweep that names a notebook: the launch's report
    launch = sweep_store["runs"][0].sweep_id
    spec = load_sweep(sweep_store["sweep"])
    assert spec.notebook.resolve() == (NOTEBOOKS_DIR / "compare_fusion.ipynb").resolve()
    out = report(spec, launch, sweep_store["overrides"], tmp_path)
    assert out == tmp_path / launch / "compare_fusion.ipynb"
    text, shown = out.read_text(), printed(out)
    # the newest launch only: the smoke launch's run (avg_pool, seed 5, pretrain) is left out
    assert (
        f"8 runs of sweep 'nbtest', launch {launch}:" in shown
        and sweep_store["older"][0].sweep_id not in text
    )
    assert "left out: 1 runs of other launches" in shown
    assert re.search(r"minus_ocr\s+2\s+2\n", shown) and re.search(r"dbfusion\s+2\s+2\n", shown)  # n per stage
    assert "finetune: runs scored per variant: {'dbfusion': 2, 'minus_ocr': 2}" in shown
    # scores while training: per-skill learning curves of both variants, in both stages (steps 1 and 2)
    assert "finetune: learning curves of 7 skills for 2 variants (dbfusion, minus_ocr)" in shown
    assert "difference from dbfusion, per seed:" in shown and "95 % bootstrap interval" in shown
    assert "image/png" in text and "normalised_mean_over_skills" in text and "vs_dbfusion" in text
    assert re.search(r"\s+dbfusion\s+2\s+\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", shown)  # scores, intervals
    # the paper's findings, in sentences computed from these runs
    assert re.search(r"- removing the OCR feature hurts OCR: (reproduced|not resolved|contradicted) at this scale"
                     r".*minus_ocr - dbfusion on ocr = [-+]\d\.\d+, 95 % interval \[[-+]\d\.\d+, [-+]\d\.\d+\] over "
                     r"2 seeds", shown)  # fmt: skip
    assert "- DBFusion is above average pooling: not measured" in shown


@pytest.mark.e2e
def test_features_notebook_runs_on_a_checkpoint(sweep_store, tmp_path):
    ckpt = next(r.result.checkpoint for r in sweep_store["runs"] if r.stage == "finetune")
    out = execute(
        NOTEBOOKS_DIR / "features.ipynb",
        tmp_path,
        env={
            "FVL_CHECKPOINT": str(ckpt),
            "FVL_ALIGN_STEPS": "20",
            "FVL_ALIGN_SAMPLES": "128",
            "FVL_ALIGN_SEEDS": "2",
        },
    )
    assert out.read_text().count("image/png") >= 2


def test_committed_notebooks_have_no_outputs():
    import nbformat

    for path in NOTEBOOKS_DIR.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(
            not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"
        ), path
