"""Both notebooks execute top to bottom against runs created here (a small real sweep with scores, after an
older smoke launch of the same sweep name)."""

import re

import pytest

from fvl.eval.notebooks import execute
from fvl.resources import shipped_dir
from fvl.train.sweep import run_sweep
from tests.fixtures import EXPERIMENTS, synthetic_recipe

NOTEBOOKS_DIR = shipped_dir("notebooks")


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    synthetic_recipe(root / "recipe.yaml", captions=64, qa=64, per_shard=32)
    exp = EXPERIMENTS
    sweep = root / "sweep.yaml"
    sweep.write_text(
        f"sweep: nbtest\nstages: [{exp / 'pretrain.yaml'}, {exp / 'finetune.yaml'}]\n"
        "overrides: [trainer.max_steps=2, data.val_samples=0, data.batch_size=8, train.global_batch_size=8, trainer.progress=false]\n"
        "eval: {samples: 14}\n"
        f"grid:\n  fusion: [{exp / 'fusion' / 'dbfusion.yaml'}, {exp / 'fusion' / 'avg_pool.yaml'}]\n  seed: [0, 1]\n"
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
    assert [r.status for r in older] == ["ok"] and [r.status for r in runs] == ["ok"] * 8
    assert all(r.scores for r in runs if r.stage == "finetune")
    assert older[0].sweep_id != runs[0].sweep_id
    return {"root": root, "uri": uri, "runs": runs, "older": older}


def printed(path) -> str:
    """Everything an executed notebook's cells printed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_compare_fusion_notebook_runs_on_a_sweep(sweep_store, tmp_path):
    out = execute(
        NOTEBOOKS_DIR / "compare_fusion.ipynb",
        tmp_path,
        env={"FVL_TRACKING_URI": sweep_store["uri"], "FVL_SWEEP": "nbtest"},
    )
    text, shown = out.read_text(), printed(out)
    launch = sweep_store["runs"][0].sweep_id
    # the newest launch only: the smoke launch's run (avg_pool, seed 5, pretrain) is left out
    assert (
        f"8 runs of sweep 'nbtest', launch {launch}:" in shown
        and sweep_store["older"][0].sweep_id not in text
    )
    assert "left out: 1 runs of other launches" in shown
    assert re.search(r"avg_pool\s+2\s+2\n", shown) and re.search(r"dbfusion\s+2\s+2\n", shown)  # n per stage
    assert "finetune: runs scored per variant: {'avg_pool': 2, 'dbfusion': 2}" in shown
    assert "difference from dbfusion, per seed:" in shown and "95 % bootstrap interval" in shown
    assert "image/png" in text and "normalised_mean_over_skills" in text and "vs_dbfusion" in text


@pytest.mark.slow
def test_features_notebook_runs_on_a_checkpoint(sweep_store, tmp_path):
    ckpt = next(r.result.checkpoint for r in sweep_store["runs"] if r.stage == "finetune")
    out = execute(
        NOTEBOOKS_DIR / "features.ipynb", tmp_path, env={"FVL_CHECKPOINT": str(ckpt), "FVL_ALIGN_STEPS": "20"}
    )
    assert out.read_text().count("image/png") >= 2


def test_committed_notebooks_have_no_outputs():
    import nbformat

    for path in NOTEBOOKS_DIR.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(
            not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code"
        ), path
