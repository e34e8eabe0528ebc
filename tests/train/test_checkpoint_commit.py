"""Checkpoints are replaced as a pair and never left half-written: the ``.ckpt`` and ``.safetensors`` of one
step go in together (a journal completes a commit that a crash interrupted), temp files of killed writes are
removed, and ``resume=last`` says so when the newest run died before its first checkpoint."""

import json
import logging
import time

import pytest
import torch
from safetensors import safe_open

from fvl.config import load
from fvl.runs.folder import RunDir
from fvl.train.checkpointing import JOURNAL, commit, recover, resolve_resume
from fvl.train.run import train
from tests.fixtures import EXPERIMENTS, synthetic_recipe


def pair(folder, ckpt: str, weights: str):
    (folder / "last.ckpt").write_text(ckpt)
    (folder / "last.safetensors").write_text(weights)


def test_a_commit_interrupted_between_its_renames_is_completed(tmp_path):
    pair(tmp_path, "step 2", "step 2")
    (tmp_path / ".last.ckpt.a1").write_text("step 4")
    (tmp_path / ".last.safetensors.b2").write_text("step 4")
    moves = {str(tmp_path / ".last.ckpt.a1"): str(tmp_path / "last.ckpt"),
             str(tmp_path / ".last.safetensors.b2"): str(tmp_path / "last.safetensors")}  # fmt: skip
    (tmp_path / JOURNAL).write_text(json.dumps(moves))
    (tmp_path / ".last.ckpt.a1").replace(tmp_path / "last.ckpt")  # the kill came after the first rename
    done = recover(tmp_path)
    assert (tmp_path / "last.ckpt").read_text() == (tmp_path / "last.safetensors").read_text() == "step 4"
    assert len(done) == 1 and not (tmp_path / JOURNAL).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.safetensors"]


def test_a_write_killed_before_its_commit_leaves_the_old_pair_and_no_temp_files(tmp_path):
    pair(tmp_path, "step 2", "step 2")
    (tmp_path / ".last.ckpt.x9").write_bytes(b"half a checkpo")  # killed while writing
    (tmp_path / f"{JOURNAL}.tmp").write_text('{"broken')  # killed while writing the journal
    (tmp_path / ".gitkeep").write_text("")  # not ours: kept
    done = recover(tmp_path)
    assert (tmp_path / "last.ckpt").read_text() == (tmp_path / "last.safetensors").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitkeep", "last.ckpt", "last.safetensors"]
    assert len(done) == 2


def test_commit_renames_both_and_removes_its_journal(tmp_path):
    pair(tmp_path, "old", "old")
    a, b = tmp_path / ".last.ckpt.1", tmp_path / ".last.safetensors.2"
    a.write_text("new")
    b.write_text("new")
    commit(tmp_path, {tmp_path / "last.ckpt": a, tmp_path / "last.safetensors": b})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.safetensors"]
    assert (tmp_path / "last.ckpt").read_text() == "new" == (tmp_path / "last.safetensors").read_text()


def test_resume_last_says_so_when_the_newest_run_has_no_checkpoint(tmp_path, caplog):
    older = RunDir.create(tmp_path, "x", "pretrain")
    older.checkpoints.mkdir(parents=True)
    older.ckpt("last").write_text("ckpt")
    time.sleep(0.01)
    newest = RunDir.create(tmp_path, "x", "pretrain")
    with caplog.at_level(logging.WARNING, logger="fvl"):
        ckpt, run = resolve_resume("last", tmp_path, "x", "pretrain")
    assert run.path == older.path and ckpt == older.ckpt("last")
    assert newest.path.name in caplog.text and "no checkpoint" in caplog.text
    older.ckpt("last").unlink()
    with pytest.raises(FileNotFoundError, match="2 run.*before their first checkpoint"):
        resolve_resume("last", tmp_path, "x", "pretrain")


@pytest.mark.integration
def test_a_training_run_writes_each_pair_from_one_step(tmp_path):
    synthetic_recipe(tmp_path / "recipe.yaml", captions=32, qa=8, per_shard=16)
    cfg = load(EXPERIMENTS / "pretrain.yaml", [
        f"data.recipe={tmp_path / 'recipe.yaml'}", f"data.shards={tmp_path / 'shards'}",
        f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "data.batch_size=4",
        "train.global_batch_size=4", "data.val_samples=0", "data.num_workers=0", "trainer.progress=false",
        "trainer.max_steps=3", "train.checkpoint_every_n_steps=2",
    ])  # fmt: skip
    result = train(cfg)
    folder = result.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "last.safetensors"]  # no temp files
    ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    with safe_open(str(folder / "last.safetensors"), "pt") as f:
        assert f.metadata()["global_step"] == str(ckpt["global_step"]) == "3"
        torch.testing.assert_close(
            f.get_tensor("projector.0.weight"), ckpt["state_dict"]["model.projector.0.weight"]
        )


class _Poison:
    """Makes the loss NaN for the micro batches in ``at`` and records the weights around them."""

    def __init__(self, at: set[int]):
        import lightning as L

        poison = self

        class Callback(L.Callback):
            def on_fit_start(self, trainer, module):
                forward = module.model.forward

                def poisoned(batch):
                    out = forward(batch)
                    if trainer.global_step in poison.at:
                        out.loss = out.loss * float("nan")
                    return out

                module.model.forward = poisoned

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.step = trainer.global_step
                poison.before[self.step] = module.model.projector[0].weight.detach().clone()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                poison.after[self.step] = module.model.projector[0].weight.detach().clone()

        self.at, self.before, self.after, self.callback = at, {}, {}, Callback()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_non_finite_loss_never_reaches_the_weights(tmp_path, mode):
    synthetic_recipe(tmp_path / "recipe.yaml", captions=32, qa=8, per_shard=16)
    cfg = load(EXPERIMENTS / "pretrain.yaml", [
        f"data.recipe={tmp_path / 'recipe.yaml'}", f"data.shards={tmp_path / 'shards'}",
        f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "data.batch_size=4",
        "train.global_batch_size=4", "data.val_samples=0", "data.num_workers=0", "trainer.progress=false",
        "trainer.max_steps=4", f"train.nonfinite_loss={mode}", "train.optimizer=adamw_fused",
    ])  # fmt: skip
    poison = _Poison({2})
    if mode == "stop":
        with pytest.raises(FloatingPointError, match="non-finite loss at step 2"):
            train(cfg, callbacks=[poison.callback])
        return
    result = train(cfg, callbacks=[poison.callback])
    assert torch.equal(poison.before[2], poison.after[2])  # the poisoned micro batch changed nothing
    assert not torch.equal(poison.before[1], poison.after[1])  # the others trained
    assert all(torch.isfinite(w).all() for w in poison.after.values())
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_metric_history(
        result.mlflow_run_id, "train/nonfinite_skipped"
    )
    assert [m.value for m in history] == [1.0]


def test_a_sharded_checkpoint_folder_is_committed_whole(tmp_path):
    """A sharded run's checkpoint is a folder: written under a temp name, swapped in whole; a crash at any
    point of the swap leaves the old folder or the new one, never a mix, and no trash behind."""
    from fvl.train.checkpointing import _move

    def shard_dir(name: str, step: str):
        d = tmp_path / name
        d.mkdir()
        (d / "__0_0.distcp").write_text(step)
        (d / "meta.pt").write_text(step)
        return d

    def step_of(d):
        return {(d / f).read_text() for f in ("__0_0.distcp", "meta.pt")}

    final = shard_dir("last.ckpt", "old")
    commit(tmp_path, {final: shard_dir(".last.ckpt.tmp", "new")})
    assert step_of(final) == {"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed after the old folder went aside, before the new one moved in
    tmp = shard_dir(".last.ckpt.tmp", "newer")
    (tmp_path / JOURNAL).write_text(json.dumps({str(tmp): str(final)}))
    final.rename(tmp_path / ".last.ckpt.trash-1")
    recover(tmp_path)
    assert step_of(final) == {"newer"} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed after both moves, before the journal went: nothing is moved twice
    tmp = shard_dir(".last.ckpt.tmp", "newest")
    (tmp_path / JOURNAL).write_text(json.dumps({str(tmp): str(final)}))
    _move(tmp, final)
    recover(tmp_path)
    assert step_of(final) == {"newest"} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed while the ranks were still writing the temp folder: the old one stays, the temp one goes
    shard_dir(".last.ckpt.tmp", "half")
    recover(tmp_path)
    assert step_of(final) == {"newest"} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
