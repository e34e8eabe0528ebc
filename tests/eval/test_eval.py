"""fvl eval on the synthetic split and on parquet files in the lmms-eval layouts; fvl chat; fvl align; fvl pca."""

import io
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fvl.config import load
from fvl.eval.benchmarks import BENCHMARKS, load_parquet, synthetic
from fvl.eval.evaluate import evaluate
from fvl.models import build_model, save_checkpoint


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


def test_parquet_benchmarks_in_lmms_eval_layouts(tmp_path):
    # TextVQA: 10 answers; VQA accuracy ladder
    tv = write_parquet(tmp_path / "textvqa.parquet", [
        {"question_id": 1, "image": png(), "question": "what brand?", "answers": ["coke"] * 3 + ["pepsi"] * 7},
        {"question_id": 2, "image": png(), "question": "what number?", "answers": ["2"] * 10},
    ])  # fmt: skip
    r = evaluate(
        Oracle(lambda p: "Coke" if "brand" in p else "two"), load_parquet("textvqa", tv), progress=False
    )
    assert r.aggregate["score"] == pytest.approx((0.9 + 1.0) / 2)
    # VQAv2: answers as dicts
    v2 = write_parquet(tmp_path / "vqav2.parquet", [
        {"question_id": 7, "image": png(), "question": "is it red?", "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
    ])  # fmt: skip
    assert (
        evaluate(Oracle(lambda p: "yes"), load_parquet("vqav2", v2), progress=False).aggregate["score"] == 1.0
    )
    # DocVQA: ANLS
    doc = write_parquet(
        tmp_path / "docvqa.parquet",
        [{"questionId": 3, "image": png(), "question": "date?", "answers": ["1 may 2020"]}],
    )
    assert evaluate(Oracle(lambda p: "1 may 2021"), load_parquet("docvqa", doc), progress=False).aggregate[
        "score"
    ] == pytest.approx(0.9)
    # ChartQA: relaxed accuracy
    chart = write_parquet(
        tmp_path / "chartqa.parquet", [{"image": png(), "question": "value?", "answer": "100"}]
    )
    assert (
        evaluate(Oracle(lambda p: "104"), load_parquet("chartqa", chart), progress=False).aggregate["score"]
        == 1.0
    )
    # POPE: yes/no parsing, precision / recall / F1
    pope = write_parquet(tmp_path / "pope.parquet", [
        {"question_id": i, "image": png(), "question": f"Is there a {o} in the image?", "answer": a, "category": "random"}
        for i, (o, a) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("cup", "no")])
    ])  # fmt: skip
    r = evaluate(
        Oracle(lambda p: "Yes, there is." if ("dog" in p or "cat" in p) else "No."),
        load_parquet("pope", pope),
        progress=False,
    )
    assert (
        r.aggregate["accuracy"] == 0.5 and r.aggregate["precision"] == 0.5 and r.aggregate["yes_ratio"] == 0.5
    )
    # MMBench: options in columns, letter answers, hint
    mmb = write_parquet(tmp_path / "mmbench.parquet", [
        {"index": 0, "image": png(), "question": "Which colour?", "hint": "Look.", "A": "red", "B": "blue", "C": "green", "D": "nan", "answer": "A", "category": "colour"},
    ])  # fmt: skip
    bench = load_parquet("mmbench", mmb)
    assert (
        bench.samples[0].prompt.endswith("directly.")
        and "C. green" in bench.samples[0].prompt
        and "D. nan" not in bench.samples[0].prompt
    )
    assert evaluate(Oracle(lambda p: "The answer is (A)."), bench, progress=False).aggregate["score"] == 1.0
    # AI2D and ScienceQA-IMG: options as a list, answer as an index
    ai2d = write_parquet(
        tmp_path / "ai2d.parquet", [{"image": png(), "question": "Q?", "options": ["x", "y"], "answer": "1"}]
    )
    assert (
        evaluate(Oracle(lambda p: "y"), load_parquet("ai2d", ai2d), progress=False).aggregate["score"] == 1.0
    )
    sqa = write_parquet(
        tmp_path / "sqa.parquet",
        [{"image": png(), "question": "Q?", "choices": ["x", "y", "z"], "answer": 2, "hint": ""}],
    )
    assert (
        evaluate(Oracle(lambda p: "C"), load_parquet("scienceqa_img", sqa), progress=False).aggregate["score"]
        == 1.0
    )
    assert {
        "textvqa",
        "vqav2",
        "vizwiz",
        "gqa",
        "pope",
        "chartqa",
        "docvqa",
        "infovqa",
        "mmbench",
        "seed",
        "ai2d",
        "scienceqa_img",
    } <= set(BENCHMARKS)


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    """A tiny checkpoint inside a run folder whose run.json points at an MLflow run in a private store."""
    import mlflow

    root = tmp_path_factory.mktemp("evalrun")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("fvl", artifact_location=root.as_uri())
    run_id = client.create_run(exp).info.run_id
    run_dir = root / "runs" / "tiny-finetune-x"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(
        json.dumps({"stage": "finetune", "name": "tiny", "mlflow_run_id": run_id, "started": "1"})
    )
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(load("tiny").model), run_dir / "checkpoints" / "last.safetensors")
    return {"root": root, "uri": uri, "run_id": run_id, "ckpt": ckpt}


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


@pytest.mark.slow
def test_fvl_eval_writes_json_and_mlflow_metrics(checkpoint_run):
    c = checkpoint_run
    res = run_cli(["eval", "latest", "--samples", "21", "--quiet"], c["root"], c["uri"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((c["ckpt"].parent.parent / "eval" / "synthetic.json").read_text())
    assert len(out["samples"]) == 21 and set(out["groups"]) <= set(out["chance"])
    metrics = MlflowClient(c["uri"]).get_run(c["run_id"]).data.metrics
    assert "eval/synthetic/score" in metrics and any(
        k.startswith("eval/synthetic/") and k != "eval/synthetic/score" for k in metrics
    )
    assert "chance" in res.stdout


@pytest.mark.slow
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


def test_alignment_curves_decrease_for_each_configuration(tmp_path):
    from fvl.eval.align import alignment_curves, parse_variant, write_curves
    from fvl.eval.config import AlignConfig

    torch.manual_seed(0)
    model = build_model(load("tiny").model)
    variants = [parse_variant("all=dbfusion:davit+caption+ocr+grounding"), parse_variant("-ocr=dbfusion:davit+caption+grounding"),
                parse_variant("davit=single_layer:davit")]  # fmt: skip
    curves = alignment_curves(model, variants, AlignConfig(steps=100, batch_size=32, samples=128))
    for label, losses in curves.items():
        assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, label
    csv_path, png_path = write_curves(curves, tmp_path)
    assert len(csv_path.read_text().splitlines()) == 1 + 3 * 100 and png_path.stat().st_size > 1000
    with pytest.raises(ValueError, match="LABEL=FUSION"):
        parse_variant("nonsense")


def test_pca_writes_one_panel_per_feature(tmp_path):
    import numpy as np

    from fvl.data.synthetic import generate
    from fvl.eval.pca import feature_pca, pca_panels, write_pca

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


@pytest.mark.slow
def test_cli_align_and_pca(tmp_path):
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_cli(["align", "--steps", "20", "--samples", "64", "--batch-size", "32", "--out", str(tmp_path / "a"),
                   "--variant", "all=dbfusion:davit+caption+ocr+grounding", "--variant", "davit=single_layer:davit"], tmp_path, env_uri)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "a" / "align.png").exists()
    res = run_cli(["pca", "--out", str(tmp_path / "p")], tmp_path, env_uri)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = MlflowClient(env_uri).search_runs(
        [MlflowClient(env_uri).get_experiment_by_name("fvl").experiment_id]
    )
    assert {r.data.tags["analysis"] for r in runs} == {"align", "pca"}
