"""The run folder's one owner: creating, finding and reading runs, and resolving what a user points at."""

import json

import pytest

from fvl.runs.folder import RunDir
from fvl.runs.weights import find_weights


def make_run(root, name="tiny", stage="pretrain", kinds=("last",), suffixes=(".safetensors", ".ckpt")):
    run = RunDir.create(root, name, stage)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        for suffix in suffixes:
            (run.checkpoints / f"{kind}{suffix}").write_bytes(b"x")
    return run


def test_create_records_identity_and_find_filters_newest_first(tmp_path):
    a = make_run(tmp_path, stage="pretrain")
    b = make_run(tmp_path, stage="finetune")
    c = make_run(tmp_path, name="other", stage="pretrain")
    assert (
        a.path.name.startswith("tiny-pretrain-")
        and a.info["stage"] == "pretrain"
        and a.info["name"] == "tiny"
    )
    assert RunDir.find(tmp_path) == [c, b, a]
    assert RunDir.find(tmp_path, stage="pretrain") == [c, a]
    assert RunDir.find(tmp_path, stage="pretrain", name="tiny") == [a]
    assert RunDir.latest(tmp_path, stage="finetune") == b
    with pytest.raises(FileNotFoundError, match="stage 'align'"):
        RunDir.latest(tmp_path, stage="align")


def test_weights_prefer_best_then_last_then_full_state(tmp_path):
    run = make_run(tmp_path, kinds=("last", "best"))
    assert run.model_weights() == run.weights("best")
    run.weights("best").unlink()
    assert run.model_weights() == run.weights("last")
    sharded = make_run(tmp_path, suffixes=(".ckpt",))
    assert sharded.model_weights() == sharded.ckpt("last")
    empty = RunDir.create(tmp_path, "tiny", "pretrain")
    with pytest.raises(FileNotFoundError, match="no best/last checkpoint"):
        empty.model_weights()
    with pytest.raises(ValueError, match="checkpoint kind"):
        run.weights("middle")


def test_of_finds_the_run_of_a_file_or_folder(tmp_path):
    run = make_run(tmp_path)
    assert RunDir.of(run.weights("last")) == run
    assert RunDir.of(run.path) == run
    assert RunDir.of(run.eval_dir / "synthetic.json") == run
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes(b"x")
    assert RunDir.of(loose) is None


def test_info_and_config_round_trip(tmp_path):
    run = make_run(tmp_path)
    run.write_config("seed: 3\n")
    assert run.config().seed == 3
    info = run.update_info(mlflow_run_id="abc", steps=4)
    assert info["name"] == "tiny" and run.mlflow_run_id == "abc"
    assert json.loads((run.path / "run.json").read_text())["steps"] == 4


def test_find_weights_file_folder_latest(tmp_path):
    old = make_run(tmp_path, stage="pretrain")
    new = make_run(tmp_path, stage="finetune")
    assert find_weights("latest", tmp_path).path == new.weights("last")
    assert find_weights("latest", tmp_path, stage="pretrain").path == old.weights("last")  # init_from=latest
    assert find_weights(old.path).path == old.weights("last")
    assert find_weights(old.ckpt("last")).path == old.weights("last")  # the safetensors sibling
    with pytest.raises(FileNotFoundError, match="init_from=.*nope.safetensors: no such file"):
        find_weights(tmp_path / "nope.safetensors", key="init_from")
    with pytest.raises(FileNotFoundError, match="train one first"):
        find_weights("latest", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no align run"):
        find_weights("latest", tmp_path, stage="align")


def test_ranks_started_inside_a_run_join_its_folder(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, "tiny", "pretrain")
    with run.shared():
        assert RunDir.create(tmp_path, "tiny", "pretrain") == run  # what a launched rank does
    assert RunDir.create(tmp_path, "tiny", "pretrain") != run  # and after the run, a new folder
    monkeypatch.setenv("RANK", "1")  # a rank other than 0 never creates a folder of its own
    other = RunDir.create(tmp_path / "elsewhere", "tiny", "pretrain")
    assert not other.path.exists()
