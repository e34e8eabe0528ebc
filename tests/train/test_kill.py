"""kill -9 a training run at several points - one of them in the middle of a checkpoint's commit - and resume
it each time with ``resume=last``: it ends at the same step, in one run folder and one MLflow run with no
step logged twice, its final weights and loss match an uninterrupted run, and no temp file is left.
The ``heavy`` tier (``make reliability``) runs it with 15 kills."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from fvl.train.checkpointing import FAULT_SLEEP, JOURNAL
from tests.fixtures import EXPERIMENTS, synthetic_recipe

EVERY = 4


def command(root: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fvl.cli", "train", str(EXPERIMENTS / "pretrain.yaml"), f"name={name}",
        f"data.recipe={root / 'recipe.yaml'}", f"data.shards={root / 'shards'}", f"output_dir={root / 'runs'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "data.batch_size=4", "train.global_batch_size=4",
        "data.val_samples=0", "data.num_workers=0", "trainer.progress=false", "train.log_every_n_steps=1",
        f"trainer.max_steps={steps}", f"train.checkpoint_every_n_steps={EVERY}", "train.warmup_ratio=0", *extra,
    ]  # fmt: skip


def logged_step(db: Path, name: str) -> int:
    """The last step the run named ``name`` logged its loss at (-1 before any)."""
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            row = conn.execute(
                "SELECT MAX(m.step) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                "WHERE m.key = 'train/loss' AND r.name LIKE ?",
                (f"{name}-%",),
            ).fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None or row[0] is None else int(row[0])


def run_until(cmd: list[str], until, env: dict[str, str] | None = None, timeout: float = 240) -> bool:
    """Start ``cmd``; kill -9 it as soon as ``until()`` holds. True when it was killed, False when it ended."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if until():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        pytest.fail("the run did not finish in time")
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    return False


@pytest.mark.e2e
@pytest.mark.parametrize("kills", [3, pytest.param(15, marks=pytest.mark.heavy)])
def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, kills: int):
    total = kills
    max_steps = 8 * kills
    synthetic_recipe(tmp_path / "recipe.yaml", captions=64, qa=8, per_shard=16)
    db = tmp_path / "mlflow.db"
    assert not run_until(command(tmp_path, "whole", max_steps), lambda: False)  # the uninterrupted reference

    rng = random.Random(0)
    targets = sorted(rng.sample(range(2, max_steps - 1), total - 1))
    kills = 0
    for target in targets:  # kill -9 once the run has logged step ``target`` (wherever it is then)
        extra = ["resume=last"] if kills else []
        kills += run_until(
            command(tmp_path, "killed", max_steps, *extra), lambda t=target: logged_step(db, "killed") >= t
        )
    # and once in the middle of a checkpoint's commit: between the renames of its .ckpt and .safetensors
    runs = tmp_path / "runs"
    in_commit = lambda: any(runs.glob(f"killed-*/checkpoints/{JOURNAL}"))  # noqa: E731
    kills += run_until(
        command(tmp_path, "killed", max_steps, "resume=last"), in_commit, env={FAULT_SLEEP: "5"}
    )
    assert kills == total
    assert not run_until(command(tmp_path, "killed", max_steps, "resume=last"), lambda: False)  # to the end

    folders = sorted(runs.glob("killed-*"))
    assert len(folders) == 1  # every resume continued the same run folder
    info = json.loads((folders[0] / "run.json").read_text())
    assert info["steps"] == max_steps
    checkpoints = folders[0] / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.safetensors"]  # no temp files
    client = MlflowClient(f"sqlite:///{db}")
    history = client.get_metric_history(info["mlflow_run_id"], "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps))  # no step logged twice
    reference = json.loads(next(runs.glob("whole-*/run.json")).read_text())
    whole = client.get_metric_history(reference["mlflow_run_id"], "train/loss")
    lost = sorted({m.step for m in whole} - set(steps))
    # Lightning logs a step's metrics just after that step's checkpoint: the kill inside the commit can take
    # that one step's values with it (the resume starts after it). No other step may be missing.
    assert len(lost) <= 1 and all((s + 1) % EVERY == 0 for s in lost), lost
    assert set(steps) <= {m.step for m in whole}
    # the last steps both runs logged (a lost step may be among the last five)
    tail = [s for s in range(max_steps - 5, max_steps) if s in set(steps)]
    mean = lambda h: sum(m.value for m in h if m.step in tail) / len(tail)  # noqa: E731
    assert tail and mean(history) == pytest.approx(mean(whole), rel=0.02)
    by_step = {m.step: m.value for m in whole}
    assert all(m.value == pytest.approx(by_step[m.step], rel=1e-3) for m in history)  # every step alike
    ours, theirs = (
        load_file(checkpoints / "last.safetensors"),
        load_file(next(runs.glob("whole-*/checkpoints/last.safetensors"))),
    )
    for key in ("projector.0.weight", "vision.davit.convs.0.conv.weight"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-4)
