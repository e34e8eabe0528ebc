"""fvl eval on the synthetic split and end to end on a checkpoint; fvl chat; fvl align; fvl pca (the public
benchmarks' protocols: test_benchmarks.py)."""

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fvl.config import load
from fvl.eval.benchmarks import synthetic
from fvl.eval.evaluate import evaluate
from fvl.models import build_model


class Oracle:
    """A stand-in model whose answers are scripted, to check scoring end to end."""

    def __init__(self, answers):
        self.answers = answers

    def eval(self):
        return self

    def generate(self, images, prompts, max_new_tokens=16):
        return [self.answers(p) for p in prompts]


def png(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_synthetic_benchmark_scores_per_skill_against_chance():
    bench = synthetic(70)
    assert {s.group for s in bench.samples} == set(bench.chance)
    answers = iter(s.references[0] for s in bench.samples)  # answered in sample order
    result = evaluate(
        Oracle(lambda p: next(answers).upper() + "."), bench, progress=False
    )  # normalised: case, period
    assert result.aggregate["score"] == 1.0 and all(v["score"] == 1.0 for v in result.groups.values())
    wrong = evaluate(Oracle(lambda p: "purple elephant"), bench, progress=False)
    assert wrong.aggregate["score"] == 0.0
    assert len(result.records) == 70 and {"id", "prediction", "references", "score", "group"} <= set(
        result.records[0]
    )


@pytest.fixture
def checkpoint_run(tiny_runs):
    """The session's tiny finetune run: a trained checkpoint in a run folder whose run.json points at its
    MLflow run in a private store (``fvl eval latest`` finds it from the folder above)."""
    run = tiny_runs["finetune"]
    return {"root": Path(tiny_runs["root"]), "uri": tiny_runs["uri"], "run_id": run["mlflow_run_id"],
            "ckpt": Path(run["checkpoint"])}  # fmt: skip


def run_cli(args, cwd, uri):
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [sys.executable, "-m", "fvl.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.mark.e2e
def test_fvl_eval_writes_json_and_mlflow_metrics(checkpoint_run):
    c = checkpoint_run
    # a public benchmark's test split (no answers) beside the synthetic one: its submission file is written
    test_split = c["root"] / "docvqa" / "data" / "test-00000-of-00001.parquet"
    test_split.parent.mkdir(parents=True)
    write_parquet(
        test_split,
        [{"questionId": i, "image": png(), "question": "What?", "answers": None} for i in range(3)],
    )
    res = run_cli(["eval", "latest", "--samples", "21", "--quiet", "--bench", "synthetic", "--bench",
                   f"docvqa:test={test_split.parent.parent}", "--agreement", "4", "--max-new-tokens", "4", "--dtype", "bfloat16"],
                  c["root"], c["uri"])  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    eval_dir = c["ckpt"].parent.parent / "eval"
    out = json.loads((eval_dir / "synthetic.json").read_text())
    assert len(out["samples"]) == 21 and set(out["groups"]) <= set(out["chance"])
    assert out["settings"]["max_new_tokens"] == 4 and out["batch_agreement"]["samples"] == 4
    assert out["settings"]["dtype"] == "bfloat16" and out["settings"]["device"] == "cpu"
    submission = json.loads((eval_dir / "submissions" / "docvqa_test_for_submission.json").read_text())
    assert [e["questionId"] for e in submission] == [0, 1, 2]
    run = MlflowClient(c["uri"]).get_run(c["run_id"]).data
    assert "eval/synthetic/score" in run.metrics and any(
        k.startswith("eval/synthetic/") and k != "eval/synthetic/score" for k in run.metrics
    )
    assert "eval/synthetic/batch_agreement" in run.metrics
    # the test split is named as such (the validation scores of the same benchmark would keep theirs)
    assert (
        run.tags["eval/docvqa_test/lmms_eval_task"] == "docvqa_test"
        and run.tags["eval/docvqa_test/split"] == "test"
        and run.tags["eval/docvqa_test/max_new_tokens"] == "4"
    )
    assert (eval_dir / "docvqa_test.json").exists()
    assert "chance" in res.stdout and "docvqa_test: 3 answers for the submission file" in res.stdout


@pytest.mark.e2e
def test_fvl_chat_answers_once(checkpoint_run, tmp_path):
    c = checkpoint_run
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    res = run_cli(
        [
            "chat",
            str(c["ckpt"]),
            "--image",
            str(tmp_path / "red.png"),
            "--max-new-tokens",
            "3",
            "What colour?",
        ],
        c["root"],
        c["uri"],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        res.stdout.strip() != "" or res.stdout == "\n"
    )  # an answer line (a random tiny model may say little)


def test_alignment_analysis_trains_and_scores_each_configuration(tmp_path):
    from fvl.config.eval import AlignConfig
    from fvl.eval.align import alignment_analysis, parse_variant, write_results

    torch.manual_seed(0)
    model = build_model(load("tiny").model)
    variants = [parse_variant("all=dbfusion:davit+caption+ocr+grounding"), parse_variant("-ocr=dbfusion:davit+caption+grounding"),
                parse_variant("davit=single_layer:davit")]  # fmt: skip
    result = alignment_analysis(
        model, variants, AlignConfig(steps=100, batch_size=32, samples=128, seeds=1, hidden=64)
    )
    assert result.heldout_pairs == 32 and len(result.runs) == 3
    for r in result.runs:  # the projection fits its training pairs, and scores above chance on held-out ones
        assert sum(r.train_loss[-10:]) / 10 < 0.9 * sum(r.train_loss[:10]) / 10, r.variant
        assert (
            r.heldout_loss < math.log(32) and 0 <= r.retrieval_top1 <= 1 and 0 <= r.matched_vs_shuffled <= 1
        )
    files = write_results(result, tmp_path)
    assert len(files.curves.read_text().splitlines()) == 1 + 3 * 100 and files.plot.stat().st_size > 1000
    assert len(files.summary.read_text().splitlines()) == 1 + 3
    with pytest.raises(ValueError, match="LABEL=FUSION"):
        parse_variant("nonsense")


def test_pca_writes_one_panel_per_feature(tmp_path):
    import numpy as np

    from fvl.eval.pca import feature_pca, pca_panels, write_pca
    from fvl.synthetic import generate

    model = build_model(load("tiny").model)
    image = generate(0, "test").image
    panels = pca_panels(model, image)
    assert list(panels) == ["davit", "caption", "ocr", "grounding"]
    for rgb, var in panels.values():
        assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1 and var.sum() <= 1 + 1e-6
    png_path, csv_path = write_pca(image, panels, tmp_path)
    assert Image.open(png_path).size[0] > Image.open(png_path).size[1] * 4  # 5 panels side by side
    assert len(csv_path.read_text().splitlines()) == 5
    # a feature whose tokens differ only inside a centre square: the border comes out black
    tokens = torch.zeros(8, 8, 16)
    tokens[2:6, 2:6] = torch.randn(16) * 5
    tokens += torch.randn(8, 8, 16) * 0.01
    rgb, _ = feature_pca(tokens.reshape(64, 16))
    assert np.all(rgb[0] == 0) and rgb[3:5, 3:5].sum() > 0


@pytest.mark.e2e
def test_cli_align_and_pca(tmp_path):
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_cli(["align", "--steps", "20", "--samples", "64", "--batch-size", "32", "--out", str(tmp_path / "a"),
                   "--variant", "all=dbfusion:davit+caption+ocr+grounding", "--variant", "davit=single_layer:davit"], tmp_path, env_uri)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "a" / "align.png").exists()
    assert (tmp_path / "a" / "align_summary.csv").exists() and "held-out loss" in res.stdout
    res = run_cli(["pca", "--out", str(tmp_path / "p")], tmp_path, env_uri)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = MlflowClient(env_uri).search_runs(
        [MlflowClient(env_uri).get_experiment_by_name("fvl").experiment_id]
    )
    assert {r.data.tags["analysis"] for r in runs} == {"align", "pca"}


def test_one_failing_benchmark_fails_alone_and_the_others_reach_disk_and_mlflow(
    tiny_runs, tmp_path, monkeypatch
):
    from fvl.config.eval import EvalConfig
    from fvl.eval.evaluate import evaluate_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_runs["uri"])
    cfg = EvalConfig(bench=[f"textvqa={tmp_path / 'nowhere'}", "synthetic"], samples=14, max_new_tokens=2)
    report = evaluate_checkpoint(
        tiny_runs["finetune"]["checkpoint"], cfg, out=tmp_path / "out", progress=False
    )
    assert list(report.failures) == [f"textvqa={tmp_path / 'nowhere'}"]
    assert [r.benchmark for r in report.results] == ["synthetic"]
    assert (tmp_path / "out" / "synthetic.json").exists() and not (tmp_path / "out" / "textvqa.json").exists()
    metrics = MlflowClient(tiny_runs["uri"]).get_run(report.mlflow_run_id).data.metrics
    assert "eval/synthetic/score" in metrics
