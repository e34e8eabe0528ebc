"""The sweep's side-by-side mode: its setting is validated, and a worker that dies fails its own point's
runs in the summary instead of the whole sweep. (The shipped desk sweep itself runs two points side by side,
one shared feature cache per stage, in the notebook tests.)"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest

from fvl.config import ConfigError
from fvl.sweep.runner import _point_result, grid_points, load_sweep
from tests.fixtures import EXPERIMENTS


def sweep_file(tmp_path, extra: str = ""):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"sweep: s\nstages: [{EXPERIMENTS / 'pretrain.yaml'}, {EXPERIMENTS / 'finetune.yaml'}]\n{extra}"
        f"grid:\n  seed: [0, 1]\n"
    )
    return path


def test_parallel_is_a_whole_number_of_processes(tmp_path):
    assert load_sweep(sweep_file(tmp_path)).parallel == 1
    assert load_sweep(sweep_file(tmp_path, "parallel: 2\n")).parallel == 2
    for bad in ("0", "two", "true", "1.5"):
        with pytest.raises(ConfigError, match="parallel"):
            load_sweep(sweep_file(tmp_path, f"parallel: {bad}\n"))


def test_a_dead_worker_fails_its_point_s_runs_not_the_sweep(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, "parallel: 2\n"))
    points = grid_points(sweep)
    dead: Future = Future()
    dead.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    runs = _point_result(dead, sweep, points, 1, "s-launch")
    assert [(r.name, r.stage, r.status) for r in runs] == [
        ("s-1", "pretrain", "failed"),
        ("s-1", "finetune", "failed"),
    ]
    assert all("BrokenProcessPool" in r.error and r.sweep_id == "s-launch" for r in runs)
    done: Future = Future()
    done.set_result(["the worker's runs"])
    assert _point_result(done, sweep, points, 0, "s-launch") == ["the worker's runs"]
