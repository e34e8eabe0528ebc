"""A tracking outage mid-run (the SQLite store locked by another process for seconds) neither stops nor
stalls training; the metrics written during it arrive once the store answers; the user is told once; and a
store that never comes back loses nothing (the writes go to the run folder)."""

import json
import logging
import sqlite3
import threading
import time

import lightning as L
import pytest
from mlflow.tracking import MlflowClient

from fvl.config import load
from fvl.train.resilient_logger import UNSENT, ResilientMLFlowLogger
from fvl.train.run import train
from tests.fixtures import EXPERIMENTS, synthetic_recipe


class LockStore(L.Callback):
    """At step ``at``, another connection takes an exclusive lock on the store for ``seconds``."""

    def __init__(self, db, at: int, seconds: float):
        self.db, self.at, self.seconds = db, at, seconds
        self.during: list[tuple[bool, int]] = []
        self.thread: threading.Thread | None = None

    def on_train_batch_end(self, trainer, *args):
        # (whether the store is locked now, the tracking writes waiting to be sent) at each step's end
        locked = self.thread is not None and self.thread.is_alive()
        self.during.append((locked, len(trainer.logger.queue)))
        if trainer.global_step == self.at and self.thread is None:
            locked = threading.Event()

            def hold():
                conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
                conn.execute("BEGIN EXCLUSIVE")
                locked.set()
                time.sleep(self.seconds)
                conn.execute("COMMIT")
                conn.close()

            self.thread = threading.Thread(target=hold, daemon=True)
            self.thread.start()
            locked.wait()


@pytest.mark.integration
def test_training_goes_on_through_a_locked_store_and_every_metric_arrives(tmp_path, caplog):
    """MLflow's SQLite store waits 20 s on a lock before it raises: a 24 s lock is an outage."""
    synthetic_recipe(tmp_path / "recipe.yaml", captions=64, qa=8, per_shard=32)
    db = tmp_path / "m.db"
    cfg = load(EXPERIMENTS / "pretrain.yaml", [
        f"data.recipe={tmp_path / 'recipe.yaml'}", f"data.shards={tmp_path / 'shards'}",
        f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{db}", "data.batch_size=4",
        "train.global_batch_size=4", "data.val_samples=0", "data.num_workers=0", "trainer.progress=false",
        "trainer.max_steps=30", "train.log_every_n_steps=1", "tracking.retry_seconds=0.5",
    ])  # fmt: skip
    lock = LockStore(str(db), at=5, seconds=24)
    with caplog.at_level(logging.WARNING, logger="fvl"):
        result = train(cfg, callbacks=[lock])
    # No step waited for the store: steps went on finishing while it was locked, and the writes they made
    # piled up in the writer's queue instead of holding the step (whatever the machine's speed).
    queued = [n for locked, n in lock.during if locked]
    assert len(queued) >= 2 and queued[-1] > queued[0]
    history = MlflowClient(f"sqlite:///{db}").get_metric_history(result.mlflow_run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(30))  # every step's loss, none twice
    assert caplog.text.count("is not answering") == 1 and caplog.text.count("answers again") == 1
    run = MlflowClient(f"sqlite:///{db}").get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["steps"] == "30"


def test_a_store_that_never_answers_again_loses_nothing(tmp_path, caplog):
    logger = ResilientMLFlowLogger(
        experiment_name="x", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", retry_seconds=0.2,
        final_wait_seconds=0.5, unsent_dir=tmp_path,
    )  # fmt: skip
    logger.log_metrics({"a": 1.0}, step=0)
    assert logger.wait_sent(30)

    def down():
        raise ConnectionError("store unreachable")

    with caplog.at_level(logging.WARNING, logger="fvl"):
        logger.submit("metrics", {"metrics": {"a": 2.0}, "step": 1}, down)
        logger.submit("metrics", {"metrics": {"a": 3.0}, "step": 2}, down)
        logger.finalize("success")
    rows = [json.loads(line) for line in (tmp_path / UNSENT).read_text().splitlines()]
    assert rows == [{"kind": "metrics", "metrics": {"a": 2.0}, "step": 1},
                    {"kind": "metrics", "metrics": {"a": 3.0}, "step": 2}]  # fmt: skip
    assert "is not answering" in caplog.text and "2 tracking writes saved" in caplog.text
