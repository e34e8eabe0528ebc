"""An MLflow logger that a tracking outage does not stop.

A locked SQLite file or a server that stops answering makes every MLflow call hang for the store's timeout
and then raise. Training must go on at full speed: each write (metrics, tags, params, artifacts) is queued,
in order, and a writer thread sends the queue; while the store does not answer it retries every
``retry_seconds``. The user is told once when an outage starts and once when it ends. At the end of the run
the queue gets ``final_wait_seconds`` to drain; whatever still cannot be written is saved to
``unsent_tracking.jsonl`` in the run folder (nothing is lost) and named in a warning.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
UNSENT = "unsent_tracking.jsonl"


class ResilientMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` whose writes survive an outage of the store (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        retry_seconds: float = 30.0,
        final_wait_seconds: float = 60.0,
        unsent_dir: str | Path | None = None,
        logged_through: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # A resumed run redoes the steps between its checkpoint and the crash, which the crashed attempt had
        # logged already: metrics of steps up to ``logged_through`` are not logged twice.
        self.logged_through = logged_through
        self.dropped_repeats = 0
        self.retry_seconds = retry_seconds
        self.final_wait_seconds = final_wait_seconds
        self.unsent_dir = Path(unsent_dir) if unsent_dir else None
        self.queue: deque[tuple[str, Any, Callable[[], Any]]] = deque()
        self.outages = 0
        self._down_since: float | None = None
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None

    # ---- what Lightning and fvl call --------------------------------------------------------------------------
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None and self.logged_through is not None and step <= self.logged_through:
            self.dropped_repeats += 1
            return
        metrics = dict(metrics)
        self.submit(
            "metrics",
            {"metrics": metrics, "step": step},
            lambda: MLFlowLogger.log_metrics(self, metrics, step),
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self.submit("params", {"count": len(params)}, lambda: MLFlowLogger.log_hyperparams(self, params))

    def submit(self, kind: str, record: Any, write: Callable[[], Any]) -> None:
        """Queue one write (``record``: what it holds, for the unsent file); the writer thread sends it."""
        with self._wake:
            self.queue.append((kind, record, write))
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._drain, name="fvl-mlflow-writer", daemon=True)
                self._writer.start()
            self._wake.notify()

    def _drain(self) -> None:
        """The writer thread: send the queue in order; when the store fails, wait ``retry_seconds``."""
        while True:
            with self._wake:
                while not self.queue:
                    if not self._wake.wait(timeout=60):
                        return  # idle: the next submit starts a new writer
                _, _, write = self.queue[0]
            try:
                write()
            except Exception as e:  # noqa: BLE001 - whatever the store raises, training goes on
                self._outage(e)
                with self._wake:
                    self._wake.wait(timeout=self.retry_seconds)
                continue
            with self._wake:
                self.queue.popleft()
                if self._down_since is not None:
                    log.warning(
                        "MLflow store answers again after %.0f s: the kept tracking writes are being written",
                        time.monotonic() - self._down_since,
                    )
                    self._down_since = None
                self._wake.notify_all()

    def _outage(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            log.warning(
                "MLflow store %s is not answering (%s: %s). Training goes on; tracking writes are kept and "
                "written when it answers (retried every %.0f s).",
                self._tracking_uri, type(error).__name__, str(error)[:200], self.retry_seconds,
            )  # fmt: skip

    @property
    def store_down(self) -> bool:
        """Whether the last write failed (an outage is going on)."""
        return self._down_since is not None

    def wait_sent(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to be written; True when it was."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._wake.notify_all()  # a writer waiting out a retry tries again now
            while self.queue and time.monotonic() < deadline:
                self._wake.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return not self.queue

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self.wait_sent(self.final_wait_seconds):
            self._save_unsent()
            return
        try:
            super().finalize(status)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: could not mark the run %s as %s (%s)", self.run_id, status, e)

    def _save_unsent(self) -> None:
        with self._wake:
            rows = [{"kind": kind, **record} for kind, record, _ in self.queue]
            self.queue.clear()
        where = (self.unsent_dir or Path(".")) / UNSENT
        where.parent.mkdir(parents=True, exist_ok=True)
        with open(where, "a") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
        log.warning(
            "MLflow store %s still not answering at the end of the run: %d tracking writes saved to %s "
            "(run %s); nothing else was lost", self._tracking_uri, len(rows), where, self.run_id,
        )  # fmt: skip
