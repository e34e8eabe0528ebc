"""Session set-up (an offline, private cache; one torch thread per xdist worker), the test tiers, and the
shared fixtures. Helpers that tests import live in ``tests/fixtures.py``.

Tiers (``--strict-markers``; README "Tests"):
- unit (no marker): no Lightning ``fit``, no Python subprocess, no second process. ``make test-fast``.
- ``integration``: an in-process ``Trainer.fit``, a shard or feature-cache build, an executed notebook.
- ``e2e``: subprocesses: the CLI as a user runs it, installs, torchrun / ``mp.spawn``, kill -9.
- opt-in, outside ``make test`` (``make test-all`` runs them): ``learning`` (the default runs must learn,
  ~11 min), ``inductor`` (compiles through inductor), ``gpu`` (needs CUDA), ``heavy`` (the fault tests at
  their full counts).
A unit test that starts a Trainer or a Python subprocess fails, saying which marker it needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

# Tiny tokenizers are built on first use into this session's own cache, so the build path is exercised.
os.environ.setdefault("FVL_CACHE", tempfile.mkdtemp(prefix="fvl-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two xdist workers on two cores: one torch thread each (a single process keeps two).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

from tests.fixtures import tiny_cfg  # noqa: E402

TIERS = ("integration", "e2e")
OPT_IN = ("learning", "inductor", "gpu", "heavy")
# Fixtures that train (they run before a test's own guard could see them): a test using one takes its tier.
FIXTURE_TIERS = {"pretrain_run": "integration", "quick_build": "integration", "tiny_runs": "integration"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & set(FIXTURE_TIERS):
            if not any(item.get_closest_marker(m) for m in TIERS):
                item.add_marker(getattr(pytest.mark, FIXTURE_TIERS[fixture]))
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def _refuse(what: str, marker: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"a unit test ran {what}: mark the test @pytest.mark.{marker} (tests/conftest.py)")

    return refuse


@pytest.fixture(autouse=True)
def _unit_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Holds unmarked tests to the unit tier's definition."""
    if any(request.node.get_closest_marker(m) for m in (*TIERS, *OPT_IN)):
        yield
        return
    import lightning.pytorch as pl
    import torch.multiprocessing as mp

    monkeypatch.setattr(pl.Trainer, "fit", _refuse("Trainer.fit", "integration"))
    monkeypatch.setattr(mp, "spawn", _refuse("torch.multiprocessing.spawn", "e2e"))
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *a, **kw):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = os.path.basename(str(argv[0])) if argv else ""
        if str(argv[0]) == sys.executable or program.startswith(("python", "fvl", "torchrun", "pip")):
            _refuse(f"a subprocess ({program})", "e2e")()
        popen_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny model shared by read-only tests (do not train it in place)."""
    from fvl.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny pretrain run and one finetune run from it (real ``train`` calls, a private MLflow store),
    built once for the whole session, xdist workers included, and shared by the tests that need trained
    checkpoints in run folders (fvl eval, fvl chat, a failing benchmark beside others). Read-only for its users:
    ``{"root", "uri", "pretrain": {...}, "finetune": {...}}`` with each run's ``run_dir``, ``checkpoint``,
    ``mlflow_run_id``."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_runs"
    done = root / "runs.json"
    with FileLock(str(root) + ".lock"):
        if not done.exists():
            done.write_text(json.dumps(_train_tiny_runs(root)))
    return json.loads(done.read_text())


def _train_tiny_runs(root) -> dict:
    from fvl.config import load
    from fvl.train.run import train
    from tests.fixtures import EXPERIMENTS, run_setting

    root.mkdir(parents=True, exist_ok=True)
    uri, shared = run_setting(root, captions=48, qa=48, per_shard=24)
    common = [
        *shared, f"output_dir={root / 'runs'}", "data.batch_size=4", "train.global_batch_size=4",
        "trainer.max_steps=6", "train.lr=1e-3", "train.warmup_ratio=0", "name=tiny",
    ]  # fmt: skip
    torch.manual_seed(0)
    runs = {}
    for stage, extra in (("pretrain", []), ("finetune", ["init_from=latest"])):
        r = train(load(EXPERIMENTS / f"{stage}.yaml", [*common, *extra]))
        runs[stage] = {
            "run_dir": str(r.run_dir),
            "checkpoint": str(r.checkpoint),
            "mlflow_run_id": r.mlflow_run_id,
        }
    return {"root": str(root), "uri": uri, **runs}
