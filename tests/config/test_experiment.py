from pathlib import Path

import numpy as np
import pytest

from fvl.config import ConfigError, load
from fvl.models import check as check_model
from tests.fixtures import EXPERIMENTS

SHIPPED = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "sweeps" not in p.parts)
SWEEPS = sorted((EXPERIMENTS / "sweeps").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {"tiny", "florence_vl_3b", "florence_vl_8b"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_shipped_yaml_loads(path: Path):
    cfg = load(path)
    assert cfg.model.fusion.features
    check_model(cfg.model)  # the names it states exist and its image tokens fit


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_loads_at_every_grid_point(path: Path):
    """Every stage with every combination of the YAML layers the grid names (a value axis such as the seed
    is one override, checked once per combination)."""
    from fvl.sweep.runner import grid_points, load_sweep

    sweep = load_sweep(path)
    points = grid_points(sweep)
    assert len(points) == int(np.prod([len(v) for v in sweep.axes.values()]))
    seen = set()
    for _labels, layers, overrides in points:
        if tuple(layers) in seen:
            continue
        seen.add(tuple(layers))
        for stage in sweep.stages:
            cfg = load(stage, [*sweep.overrides, *overrides], layers=layers)
            assert cfg.model.fusion.features


def test_presets_by_name_and_include():
    b3, b8 = load("florence_vl_3b"), load("florence_vl_8b")
    assert b3.model.llm.arch["model_type"] == "phi3" and b3.model.text.template == "phi3"
    assert b8.model.llm.arch["model_type"] == "llama" and b8.model.text.template == "llama3"
    # the 8B preset states only its difference: the vision side comes from the 3B include
    assert b8.model.vision == b3.model.vision
    assert b8.model.llm.arch["hidden_size"] == 4096 and b8.model.llm.arch["num_key_value_heads"] == 8


def test_overrides_apply_and_lists_replace():
    cfg = load("tiny", ["model.fusion.features=[davit]", "model.fusion.name=single_layer"])
    assert list(cfg.model.fusion.features) == ["davit"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.fusion.nam=x", "model.fusion.nam"),
        ("model.vision.image_size=big", "model.vision.image_size"),
        ("model.llm.init=downloaded", "model.llm.init"),
        ("model.fusion.name=single_layer", "single_layer takes exactly one feature"),
        ("nonsense", "expected key=value"),
        ("init_from=latest", "names no stage.init_stage"),
    ],
)
def test_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load("tiny", [override])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.projector.name=mlp0x_gelu", "model.projector.name"),
        (
            "model.text.template=vicuna",
            r"model.text.template \(or stage.template\)='vicuna': expected one of",
        ),
        ("model.fusion.name=nope", "model.fusion.name='nope'"),
        ("model.vision.name=nope", "model.vision.name='nope'"),
    ],
)
def test_names_the_code_does_not_know_are_refused_before_a_build(override, fragment):
    cfg = load("tiny", [override])  # the config layer knows no registry
    with pytest.raises(ValueError, match=fragment):
        check_model(cfg.model)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusion:\n    colour: red\n")
    with pytest.raises(ConfigError) as err:
        load(bad)
    assert str(bad) in str(err.value) and "model.fusion.colour" in str(err.value)


def test_include_relative_and_cycle(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  fusion:\n    name: avg_pool\n")
    (tmp_path / "child.yaml").write_text("include: [base.yaml]\nseed: 3\n")
    cfg = load(tmp_path / "child.yaml")
    assert cfg.model.fusion.name == "avg_pool" and cfg.seed == 3
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load(tmp_path / "a.yaml")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="neither a YAML file nor an experiment or model preset"):
        load("florence_vl_70b")


def test_missing_pretrained_path_is_a_clear_error():
    from fvl.models import build_model

    with pytest.raises(FileNotFoundError, match=r"model\.(llm|vision)\.path is not set"):
        build_model(load("florence_vl_3b").model)


def test_image_tokens_must_leave_room_for_text():
    with pytest.raises(
        ValueError, match=r"max_length=2048 leaves no room for text: one image is 2304 tokens"
    ):
        check_model(load("florence_vl_3b", ["model.fusion.name=token_concat"]).model)
    # the shipped token_concat variant raises the budget; the paper's 1728 tokens fit the default
    from fvl.config import resolve_path

    assert (
        load(
            "florence_vl_3b", layers=[resolve_path("experiments/fusion/token_concat.yaml")]
        ).model.text.max_length
        == 2816
    )
    check_model(
        load(
            "florence_vl_3b",
            ["model.fusion.name=token_concat", "model.fusion.features=[caption,ocr,grounding]"],
        ).model
    )


def test_a_tower_path_with_random_init_is_refused_not_ignored():
    with pytest.raises(ValueError, match="model.vision.init=pretrained"):
        load("tiny", ["model.vision.path=/some/florence2"])


def test_a_sweeps_notebook_is_a_shipped_name_or_a_path_and_a_wrong_one_is_refused(tmp_path: Path):
    from fvl.sweep.runner import load_sweep
    from fvl.util.resources import shipped_dir

    stage = EXPERIMENTS / "pretrain.yaml"
    (tmp_path / "mine.ipynb").write_text("{}")
    for value, expected in [("compare_fusion", shipped_dir("notebooks") / "compare_fusion.ipynb"),
                            ("mine.ipynb", tmp_path / "mine.ipynb")]:  # fmt: skip
        (tmp_path / "s.yaml").write_text(f"sweep: s\nstages: [{stage}]\nnotebook: {value}\n")
        assert load_sweep(tmp_path / "s.yaml").notebook.resolve() == expected.resolve()
    (tmp_path / "s.yaml").write_text(f"sweep: s\nstages: [{stage}]\nnotebook: compare_fuson\n")
    with pytest.raises(ConfigError, match="notebook 'compare_fuson' not found.*compare_fusion"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(f"sweep: s\nstages: [{stage}]\n")
    assert load_sweep(tmp_path / "s.yaml").notebook is None


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_desk_sweeps_data_cut_holds_what_each_of_its_runs_reads(stage: str):
    """`synthetic_desk` is cut to what one desk run reads, so the cut must hold at least that: a shorter cut
    would make the runs read samples twice, which the full recipe never did."""
    from fvl.data.recipes import load_recipe

    cfg = load(EXPERIMENTS / "sweeps" / "desk" / f"{stage}.yaml")
    recipe = load_recipe(cfg.data.recipe)
    assert recipe.path.endswith("synthetic_desk.yaml") and cfg.data.shards.endswith("synthetic_desk")
    held = sum(recipe.source(name).num_samples for name in cfg.data.sources)
    reads = cfg.trainer.max_steps * cfg.train.global_batch_size
    assert reads <= held < 1.1 * reads + 1000, (stage, reads, held)


def test_load_returns_the_typed_config_and_round_trips_through_yaml():
    from fvl.config import ExperimentConfig, from_yaml, to_yaml, with_overrides

    cfg = load("tiny", ["stage=finetune", "model.fusion.name=avg_pool"])
    assert isinstance(cfg, ExperimentConfig) and cfg.model.text.template == "phi3"
    assert from_yaml(to_yaml(cfg)) == cfg
    changed = with_overrides(cfg, ["seed=7"])
    assert changed.seed == 7 and cfg.seed == 0
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        with_overrides(cfg, ["data.batch_size=3", "train.global_batch_size=8"])


@pytest.mark.parametrize(
    "world, fits", [(32, "data.batch_size=8"), (64, "data.batch_size=4"), (128, "data.batch_size=2")]
)
def test_a_global_batch_that_the_gpus_cannot_split_names_the_micro_batch_that_fits(world, fits):
    cfg = load("florence_vl_8b_finetune")
    if world == 32:
        assert cfg.gradient_accumulation(world) == 1
        return
    with pytest.raises(ValueError, match=f"set {fits}"):
        cfg.gradient_accumulation(world)


def test_the_fsdp_trade_offs_are_checked_keys():
    cfg = load("finetune", ["trainer.fsdp_reduce=step", "trainer.fsdp_gather_dtype=bfloat16"])
    assert (cfg.trainer.fsdp_reduce, cfg.trainer.fsdp_gather_dtype) == ("step", "bfloat16")
    assert load("finetune").trainer.fsdp_reduce == "micro_batch"  # the least memory stays the default
    with pytest.raises(ConfigError, match="fsdp_reduce"):
        load("finetune", ["trainer.fsdp_reduce=never"])
    with pytest.raises(ConfigError, match="fsdp_gather_dtype"):
        load("finetune", ["trainer.fsdp_gather_dtype=float16"])


def test_fsdp_cpu_offload_is_refused_without_a_gpu(monkeypatch):
    import torch

    from fvl.models import build_model
    from fvl.train.strategy import shard_model

    assert load("finetune", ["trainer.fsdp_cpu_offload=true"]).trainer.fsdp_cpu_offload
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU"):
        shard_model(build_model(load("tiny").model), mesh=None, cpu_offload=True)
