"""Presets, offline tiny assets, arch validation and the command line."""

import filecmp
import json
import os
import subprocess
import sys

import lightning.pytorch  # noqa: F401 - binds its log handler to the real stderr, before any capsys
import pytest
import torch

from fvl.cli import main
from fvl.models import build_model
from tests.fixtures import TINY_LLAMA, stage_trainable, tiny_cfg


def test_tiny_tokenizers_are_deterministic(tmp_path, monkeypatch):
    from fvl.assets import tiny_tokenizers as tiny_assets

    dirs = []
    for name in ("a", "b"):
        monkeypatch.setenv("FVL_CACHE", str(tmp_path / name))
        dirs.append(tiny_assets.tiny_tokenizer_dirs())
    for left, right in zip(*dirs, strict=True):
        assert filecmp.cmp(left / "tokenizer.json", right / "tokenizer.json", shallow=False)


def test_tiny_training_step_is_fast_enough_to_learn_on_a_cpu():
    """Sanity, not a benchmark: the tiny preset stays small (1.3M parameters with its 4 x 128 LLM)."""
    from fvl.models import set_trainable

    model = build_model(tiny_cfg())
    counts = set_trainable(model, stage_trainable("pretrain"))
    total = sum(c["trainable"] for c in counts.values())
    assert 1_000_000 < total < 1_600_000
    assert model.num_image_tokens == 16


@pytest.mark.parametrize(
    "replace, match",
    [
        ({"llm_arch": {**TINY_LLAMA, "hiden_size": 8}}, r"unknown keys for LlamaConfig: \['hiden_size'\]"),
        ({"llm_arch": {**TINY_LLAMA, "model_type": "llamaa"}}, "not a transformers architecture"),
        ({"vision_arch": {"vision_config": {"depth": [1]}}}, "unknown keys for Florence2VisionConfig"),
    ],
)
def test_random_init_arch_typos_fail(replace, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_cfg(**replace))


def test_cli_info(capsys):
    assert main(["info", "tiny", "model.fusion.name=token_concat", "--stage", "finetune"]) == 0
    out = capsys.readouterr().out
    assert "-> 64 LLM tokens/image" in out and "vision" in out


@pytest.mark.e2e
def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "fvl.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "export" in res.stdout


def test_real_size_presets_build_lazily_with_random_init():
    """The 3B preset at real size, random init, on the meta device: the counts of the paper's model."""
    from fvl.config import load

    cfg = load("florence_vl_3b", ["model.vision.init=random", "model.llm.init=random"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.vision.num_tokens == 576 and model.num_image_tokens == 576
    assert model.fusion.output_dim == 4096 and model.hidden_size == 3072
    davit = sum(p.numel() for p in model.vision.davit.parameters())
    assert abs(davit - 360.6e6) / 360.6e6 < 0.01  # Florence-2-large DaViT: 360.6M
    llm = sum(p.numel() for p in model.llm.parameters())
    assert abs(llm - 3.82e9) / 3.82e9 < 0.01  # Phi-3.5-mini


@pytest.mark.e2e
def test_cli_errors_are_one_line_and_v_shows_the_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2  # (the one-line form of many more: below)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fvl train: error: config file not found: {tmp_path / 'nope.yaml'} (-v for the traceback)"
    ]
    res = subprocess.run([sys.executable, "-m", "fvl", "-v", "train", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode != 0 and "Traceback" in res.stderr
    res = subprocess.run([sys.executable, "-m", "fvl", "trian"], capture_output=True, text=True)
    assert res.returncode == 2 and "commands:" in res.stderr


def test_every_command_has_a_generated_parser_with_help():
    from fvl.cli import COMMANDS
    from fvl.cli.args import build_parser, field_docs

    for name, (cls, _func) in COMMANDS.items():
        text = build_parser(cls, f"fvl {name}").format_help()
        assert cls.__doc__.split("\n")[0].rstrip(".")[:30] in " ".join(text.split())
        assert field_docs(cls), name


@pytest.mark.integration  # a whole benchmark step
def test_bench_step_smoke_on_the_tiny_preset(capsys, tmp_path):
    import json

    assert main(["bench", "step", "--tiny", "--json", str(tmp_path / "step.json")]) == 0
    out = capsys.readouterr().out
    assert "step (tiny, single device)" in out and "ms/step" in out and "MFU" in out
    r = json.loads((tmp_path / "step.json").read_text())
    assert r["model_tflop_per_step"] > 0 and r["mfu"] > 0
    # the same step under fvl's FSDP2 wrapping, then the consolidated safetensors
    assert (
        main(["bench", "step", "--tiny", "--fsdp", "--batch", "2", "--json", str(tmp_path / "fsdp.json")])
        == 0
    )
    r = json.loads((tmp_path / "fsdp.json").read_text())
    assert r["strategy"].startswith("fsdp2") and r["consolidated_gib"] > 0
    import torch.distributed as dist

    assert not dist.is_initialized()  # the process group it started ended with it
    assert "MASTER_PORT" not in os.environ  # and the environment of later runs is untouched


def test_bench_record_keeps_every_headline_and_other_benchmarks(tmp_path):
    from fvl.bench.runner import HEADLINES, record

    path = tmp_path / "latest.json"
    record("packing", {"x": 1}, {"packing_tokens_per_s_gain": 1.5}, path=path)
    record("loader", {"y": 2}, path=path)
    latest = json.loads(path.read_text())
    assert set(HEADLINES) <= set(latest) and set(latest["results"]) == {"packing", "loader"}
    assert latest["packing_tokens_per_s_gain"]["value"] == 1.5 and latest["results"]["loader"]["y"] == 2
    assert latest["gpu_mfu"]["value"] is None and "GPU" in latest["gpu_mfu"]["why"]
    assert latest["results"]["packing"]["date"] and latest["results"]["packing"]["torch"]


def test_bench_pretrain_times_make_pretrains_command(monkeypatch):
    import fvl.bench.pretrain as bp

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bp.subprocess, "run", fake_run)
    r = bp.bench_pretrain(runs=3)
    assert len(calls) == 3 and r["median_seconds"] == sorted(r["seconds"])[1]
    assert calls[0][3:5] == ["train", "experiments/pretrain.yaml"]  # what make pretrain runs
    assert len({c[5] for c in calls}) == 3  # a fresh run folder (and shards) each time


def test_every_bench_module_says_its_figures_and_names_a_known_headline():
    import importlib

    from fvl.bench.runner import HEADLINES

    for name in ("images", "loader", "features", "pretrain", "packing", "towers", "fsdp_plan"):
        module = importlib.import_module(f"fvl.bench.{name}")
        assert callable(module.lines), name
        headline = getattr(module, "HEADLINE", None)
        assert headline is None or headline[0] in HEADLINES, name


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("trainer.max_stpes=3", "Did you mean: 'max_steps'"),
        ("trainer.max_steps=abc", "max_steps"),
        ("train.lr=-1", "train.lr must be positive"),
        ("data.batch_size=0", "data.batch_size must be positive"),
        ("model.llm.loss=nope", "model.llm.loss"),
        ("model.projector.name=mlp0x_gelu", "mlp0x_gelu"),
        ("stage=nope", "no stage named 'nope'"),
        ("data.recipe=nope", "recipe 'nope' not found"),
        ("model.fusion.name=nope", "model.fusion.name='nope': expected one of"),
        ("model.fusion.features=[davit,nope]", "unknown vision feature(s) ['nope']"),
        ("data.feature_cache=/nope", "a cache holds a frozen tower's features"),
        ("init_from=/nope.safetensors", "no such file or run folder"),
        ("resume=last", "resume=last: no last.ckpt"),
    ],
)
def test_config_and_cli_mistakes_are_one_line_errors(override, hint, tmp_path, capsys):
    code = main(["train", "pretrain", override, f"output_dir={tmp_path / 'runs'}", "trainer.progress=false",
                 f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"data.shards={tmp_path / 'shards'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fvl train: error: "), err
    assert hint in err[0] and "Traceback" not in err[0]
