"""Both notebooks execute top to bottom against runs created here (a small real sweep with scores)."""

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
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = run_sweep(sweep, [f"data.recipe={root / 'recipe.yaml'}", f"data.shards={root / 'shards'}",
                             f"output_dir={root / 'runs'}", f"tracking.uri={uri}", "data.num_workers=0"])  # fmt: skip
    assert [r.status for r in runs] == ["ok"] * 8
    assert all(r.scores for r in runs if r.stage == "finetune")
    return {"root": root, "uri": uri, "runs": runs}


@pytest.mark.slow
def test_compare_fusion_notebook_runs_on_a_sweep(sweep_store, tmp_path):
    out = execute(
        NOTEBOOKS_DIR / "compare_fusion.ipynb",
        tmp_path,
        env={"FVL_TRACKING_URI": sweep_store["uri"], "FVL_SWEEP": "nbtest"},
    )
    text = out.read_text()
    assert "8 runs of sweep 'nbtest'" in text and "image/png" in text and "mean_over_skills" in text


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
