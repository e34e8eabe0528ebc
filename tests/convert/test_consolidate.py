"""A run that stopped before its end keeps only sharded checkpoint folders (torch's distributed checkpoint, as
an FSDP run writes them): they consolidate to one safetensors file on one process, and init_from, fvl eval
and a run folder read them directly."""

import json

import torch
import torch.distributed.checkpoint as dcp

from fvl.cli import main
from fvl.config import load, to_yaml
from fvl.models import build_model, load_checkpoint
from fvl.models.loading import load_weights_file
from fvl.runs.weights import find_weights


def sharded_run(root):
    """A run folder whose only checkpoint is a sharded ``last.ckpt/`` (model and optimizer state)."""
    torch.manual_seed(0)
    cfg = load("tiny")
    model = build_model(cfg.model)
    run = root / "tiny-pretrain-x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "run.json").write_text(json.dumps({"name": "tiny", "stage": "pretrain", "started": "1"}))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    optimizer = {"0": {"exp_avg": torch.ones(3)}}
    dcp.save(
        {"state_dict": state, "optimizer_states": optimizer},
        checkpoint_id=run / "checkpoints" / "last.ckpt",
        no_dist=True,
    )
    return run, model


def test_a_run_with_only_sharded_folders_consolidates_and_loads(tmp_path, capsys):
    run, model = sharded_run(tmp_path)
    folder = run / "checkpoints" / "last.ckpt"
    assert find_weights(run).path == folder  # no safetensors yet: the folder itself
    loaded = load_weights_file(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert main(["checkpoints", "consolidate", str(run)]) == 0
    written = run / "checkpoints" / "last.safetensors"
    assert str(written) in capsys.readouterr().out
    consolidated = load_checkpoint(written)  # strict: every key of the model
    for name, tensor in model.state_dict().items():
        assert torch.equal(consolidated.state_dict()[name], tensor), name
    assert find_weights(folder).path == written  # the folder's file, once written


def test_init_from_a_sharded_folder(tmp_path):
    from fvl.models.loading import load_model_weights

    run, model = sharded_run(tmp_path)
    fresh = build_model(load("tiny").model)
    load_model_weights(fresh, run / "checkpoints" / "last.ckpt")  # what init_from does with the path
    assert torch.equal(fresh.projector[0].weight, model.projector[0].weight)


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint(tmp_path):
    assert main(["checkpoints", "consolidate", str(tmp_path)]) == 2


def test_resuming_a_sharded_checkpoint_without_fsdp_is_refused_with_the_ways_that_work(tmp_path):
    import pytest

    from fvl.train.run import train

    run, _ = sharded_run(tmp_path)
    folder = run / "checkpoints" / "last.ckpt"
    cfg = load("pretrain", [f"resume={folder}", f"output_dir={tmp_path}", "trainer.strategy=auto"])
    with pytest.raises(ValueError, match=r"resumes with trainer.strategy=fsdp.*init_from=.*consolidate"):
        train(cfg)


def test_deepspeed_is_refused_before_a_run_folder(tmp_path):
    import pytest

    from fvl.train.run import train

    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        train(load("pretrain", [f"output_dir={tmp_path}", "trainer.strategy=deepspeed_stage_2"]))
    assert not any(tmp_path.iterdir())
