"""How long ``make pretrain`` takes once the venv exists: ``bench_pretrain()``.

Each run is the command ``make pretrain`` runs (``fvl train experiments/pretrain.yaml``) in a fresh
process with fresh shards, run folder and MLflow store in a temporary folder, so the shard build is
included as it is on a fresh clone. The figure is the median wall time over the runs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def pretrain_command(root: Path, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "fvl.cli", "train", "experiments/pretrain.yaml", f"output_dir={root / 'runs'}",
        f"data.shards={root / 'shards'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "trainer.progress=false",
        *(extra or []),
    ]  # fmt: skip


def bench_pretrain(runs: int = 3, extra: list[str] | None = None) -> dict:
    """Wall seconds of each run and their median (see the module docstring)."""
    seconds = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="fvl-bench-pretrain-") as tmp:
            start = time.perf_counter()
            done = subprocess.run(pretrain_command(Path(tmp), extra), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"pretrain failed ({done.returncode}): {done.stderr[-2000:]}")
            seconds.append(time.perf_counter() - start)
    return {
        "runs": runs,
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "extra": extra or [],
    }


HEADLINE = ("pretrain_seconds_median", "median_seconds")


def lines(r: dict) -> list[str]:
    runs = ", ".join(f"{x:.0f} s" for x in r["seconds"])
    return [
        f"make pretrain (fresh shards and run folder each time): {runs}; median {r['median_seconds']:.0f} s"
    ]
