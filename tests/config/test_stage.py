"""Stages are data: ``experiments/stages/*.yaml`` declare what a stage trains and how its data looks, a plain
``stage: NAME`` stands for that file, and a new stage is one YAML file."""

import pytest

from fvl.config import ConfigError, load, resolve_path
from fvl.config.stage import StageConfig


def test_the_stage_name_stands_for_its_yaml_in_overrides_and_files(tmp_path):
    by_override = load("tiny", ["stage=finetune"])
    assert by_override.stage.name == "finetune" and list(by_override.stage.trainable) == [
        "fusion",
        "projector",
        "llm",
    ]
    assert by_override.init_from == "latest" and by_override.stage.init_stage == "pretrain"
    assert list(by_override.data.sources) == ["synthetic_qa"]
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"include: [{resolve_path('tiny')}]\nstage: align\nseed: 7\n")
    cfg = load(exp)
    assert (
        cfg.stage.name == "align" and cfg.seed == 7 and list(cfg.stage.trainable) == ["fusion", "projector"]
    )


def test_the_stage_derives_the_template_in_one_place():
    assert load("pretrain").model.text.template == "plain"  # the stage's own template wins over the preset's
    assert load("finetune").model.text.template == "phi3"  # empty: the preset's chat template
    assert load("florence_vl_8b_finetune").model.text.template == "llama3"
    assert load("florence_vl_8b_pretrain").model.text.template == "plain"
    # the derived value is part of the loaded config, not only of the dataclass
    assert load("pretrain").model.text.template == "plain"


def test_a_new_stage_is_one_yaml_file(tmp_path, monkeypatch, capsys):
    from fvl.cli import main

    stages = tmp_path / "experiments" / "stages"
    stages.mkdir(parents=True)
    (stages / "tower_only.yaml").write_text(
        "stage: {name: tower_only, trainable: [vision], template: plain, resize_mode: square, val_task: caption}\n"
    )
    monkeypatch.chdir(tmp_path)  # a project's own experiments/ comes first
    cfg = load("tiny", ["stage=tower_only"])
    assert list(cfg.stage.trainable) == ["vision"]
    assert main(["info", "tiny", "--stage", "tower_only"]) == 0
    out = capsys.readouterr().out
    assert "stage tower_only" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["vision"][2] != "0" and lines["llm"][2] == "0" and lines["projector"][2] == "0"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stage=warmup"], "no stage named 'warmup'"),
        (["stage.trainable=[vision,decoder]"], "unknown components"),
        (["stage.resize_mode=crop"], "stage.resize_mode"),
        (["stage.val_task=ocr"], "stage.val_task"),
        (["stage.name=pre train"], "stage.name"),
        (["stage=pretrain", "init_from=latest"], "names no stage.init_stage"),
    ],
)
def test_stage_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load("tiny", overrides)


def test_a_stage_template_the_code_does_not_know_is_refused_before_a_build():
    from fvl.models import check

    with pytest.raises(ValueError, match=r"stage.template\)='vicuna'"):
        check(load("tiny", ["stage.template=vicuna"]).model)


def test_the_stage_schemas_validation_tasks_are_the_synthetic_splits():
    from fvl.config.stage import VAL_TASKS
    from fvl.synthetic import TASKS

    assert VAL_TASKS == TASKS


def test_schema_default_is_stage_one():
    stage = StageConfig()
    assert stage.name == "pretrain" and "vision" in stage.trainable and stage.module == "default"
