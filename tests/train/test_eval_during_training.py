"""Benchmark scores while a run trains (``eval.during_training``): logged at the steps asked, equal to what
``fvl eval`` gives the same weights, written as fvl eval's JSON, never twice for one step across a resume,
and a wrong benchmark is an error before the first step."""

import json

import pytest
from mlflow.tracking import MlflowClient

from fvl.config import load
from fvl.train.eval_during_training import SECONDS_KEY, EvalDuringTraining
from fvl.train.run import train
from tests.fixtures import EXPERIMENTS, run_setting


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_during")
    uri, common = run_setting(root, captions=100, qa=100, per_shard=50)
    overrides = [
        *common, f"output_dir={root / 'runs'}", "data.batch_size=4", "train.global_batch_size=8", "init_from=",
        "train.lr=1e-3", "eval.during_training.every_n_steps=2", "eval.during_training.limit=14",
        "eval.batch_size=7", "train.checkpoint_every_n_steps=2",
    ]  # fmt: skip
    return {"root": root, "uri": uri, "overrides": overrides}


@pytest.mark.integration
def test_scores_at_the_steps_asked_equal_fvl_eval_and_a_resume_repeats_none(env):
    from fvl.eval.benchmarks import resolve_benchmark
    from fvl.eval.evaluate import evaluate, metrics_of
    from fvl.models import load_checkpoint

    cfg = load(EXPERIMENTS / "finetune.yaml", [*env["overrides"], "trainer.max_steps=4"])
    first = train(cfg)
    client = MlflowClient(env["uri"])
    history = client.get_metric_history(first.mlflow_run_id, "eval/synthetic/score")
    assert [m.step for m in history] == [2, 4]
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "eval/synthetic/colour")] == [2, 4]
    # the same code as fvl eval: the last step's scores are what evaluate() gives the run's last weights
    model = load_checkpoint(first.run_dir / "checkpoints" / "last.safetensors")
    again = metrics_of(evaluate(model, resolve_benchmark("synthetic", 14), batch_size=7, progress=False))
    logged = client.get_run(first.mlflow_run_id).data.metrics
    assert {k: logged[k] for k in again} == pytest.approx(again)
    # fvl eval afterwards logs at the step of the weights it scored: on the same axis, and the run's latest
    from fvl.config.eval import EvalConfig
    from fvl.eval.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(first.run_dir / "checkpoints" / "last.safetensors", EvalConfig(samples=21),
                                 tracking=cfg.tracking, progress=False)  # fmt: skip
    history = client.get_metric_history(first.mlflow_run_id, "eval/synthetic/score")
    assert [m.step for m in history] == [2, 4, 4]
    latest = client.get_run(first.mlflow_run_id).data.metrics["eval/synthetic/score"]
    assert latest == pytest.approx(report.results[0].aggregate["score"])
    # fvl eval's JSON, one folder per evaluation
    written = json.loads(
        (first.run_dir / "eval" / "during_training" / "step-4" / "synthetic.json").read_text()
    )
    assert written["settings"]["step"] == 4 and len(written["samples"]) == 14
    assert written["aggregate"]["score"] == pytest.approx(again["eval/synthetic/score"])

    resumed = train(
        load(EXPERIMENTS / "finetune.yaml", [*env["overrides"], "trainer.max_steps=6", "resume=last"])
    )
    assert resumed.mlflow_run_id == first.mlflow_run_id
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, SECONDS_KEY)]
    assert steps == [2, 4, 6]  # step 4 (the resume's start) is not evaluated again
    scores = client.get_metric_history(first.mlflow_run_id, "eval/synthetic/score")
    assert [m.step for m in scores] == [2, 4, 4, 6]  # fvl eval's at 4 included


@pytest.mark.integration
def test_a_benchmark_that_cannot_be_read_fails_before_the_first_step(env, tmp_path):
    cfg = load(EXPERIMENTS / "finetune.yaml", [*env["overrides"], "trainer.max_steps=2", "name=badbench",
                                               f"eval.during_training.benchmarks=[textvqa={tmp_path / 'nope'}]"])  # fmt: skip
    with pytest.raises(Exception, match="nope"):
        train(cfg)
    runs = list((env["root"] / "runs").glob("badbench-*/checkpoints/*.safetensors"))
    assert runs == []  # no step was trained


def test_the_steps_evaluated_travel_with_the_checkpoint_and_the_store():
    class Logger:
        run_id = "r"

        class experiment:  # noqa: N801 - the MLflow client's shape
            @staticmethod
            def get_metric_history(run_id, key):
                assert key == SECONDS_KEY
                return [type("M", (), {"step": s}) for s in (2, 4, 6)]

    from fvl.train.eval_during_training import _steps_logged

    cfg = load("finetune", ["eval.during_training.every_n_steps=2"])
    callback = EvalDuringTraining(cfg, None)
    callback.load_state_dict({"evaluated": [2, 4]})
    callback.evaluated |= set(_steps_logged(Logger()))
    assert callback.state_dict() == {"evaluated": [2, 4, 6]}
    assert _steps_logged(type("NoRun", (), {"run_id": None})()) == []


def test_the_config_keys():
    cfg = load("finetune", ["eval.during_training.every_n_steps=50", "eval.during_training.limit=20"])
    dt = cfg.eval.during_training
    assert dt.enabled and dt.bench() == ["synthetic"] and dt.limit == 20
    assert not load("finetune").eval.during_training.enabled
    with pytest.raises(Exception, match="every_n_steps"):
        load("finetune", ["eval.during_training.every_n_steps=-1"])
