"""kill -9 a shard build (its whole process group, workers included, as a preempted job dies) at several
points: every tar under its final name is complete whenever it is killed, and a rerun completes to the
manifest of an uninterrupted build (same shards, sizes and sha256)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvl.data.tarindex import load_index, scan

SAMPLES = 6000  # synthetic: a build of several seconds on 2 cores, in tasks of 250


def build_command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fvl.cli", "shards", "build", str(recipe), "--out", str(out), "--workers", "2",
            "--quiet"]  # fmt: skip


def assert_every_final_tar_is_complete(out: Path) -> int:
    """Every ``*.tar`` under its final name scans to whole samples that end at its end (nothing cut)."""
    tars = sorted(out.glob("*.tar"))
    for tar in tars:
        spans = scan(tar)
        # after the last member: tar's two 512-byte end blocks, then padding to its 10240-byte record
        closed = -(-(spans["end"][-1] + 1024) // 10240) * 10240
        assert len(spans) and spans["end"][-1] <= tar.stat().st_size <= closed, tar
        assert len(load_index(tar)) == len(spans), tar
    return len(tars)


@pytest.mark.e2e
def test_kill_9_during_a_shard_build_then_rerun_gives_the_same_manifest(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"sources:\n  - {{name: s, format: synthetic, num_samples: {SAMPLES}, task: qa}}\n"
        "shards: {samples_per_shard: 250}\n"
    )
    reference = tmp_path / "reference"
    subprocess.run(build_command(recipe, reference), check=True, capture_output=True, timeout=300)
    expected = json.loads((reference / "manifest.json").read_text())

    out = tmp_path / "killed"
    seen = []
    for delay in (2.5, 3.5, 4.5):  # after start-up, while tasks are being written
        proc = subprocess.Popen(build_command(recipe, out), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.append(assert_every_final_tar_is_complete(out))  # what a reader could open now is whole
    assert not (out / "manifest.json").exists() or seen[-1] == len(expected["shards"])
    assert seen[0] < len(expected["shards"])  # the first kill really stopped it halfway
    done = subprocess.run(build_command(recipe, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == expected["shards"]  # same names, sample counts, sizes and sha256
    assert manifest["sources"]["s"]["written"] == SAMPLES
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert not leftovers
