"""The feature cache against the tower, side by side in one run: ``bench_cache()``.

``make finetune``'s configuration (``experiments/finetune.yaml``: the tiny preset, stage 2, batch 32, one
DataLoader worker) trains from the same random-init checkpoint twice, without and then with
``data.feature_cache``, for ``steps`` steps each, the two runs taking turns ``repeats`` times. The figure
is ``train/samples_per_s`` as the run logs it to MLflow (read back from the store), the median over a run's
steps after the first ``warmup``; the speed-up is the ratio of the medians over repeats. The cache build
(one tower pass over the stage's samples) is timed too: it is what a run must amortise.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def _samples_per_s(uri: str, run_id: str, warmup: int) -> float:
    from mlflow.tracking import MlflowClient

    history = sorted(
        MlflowClient(uri).get_metric_history(run_id, "train/samples_per_s"), key=lambda m: m.step
    )
    values = [m.value for m in history[warmup:]] or [m.value for m in history]
    return statistics.median(values)


def bench_cache(
    steps: int = 150, repeats: int = 2, warmup: int = 2, shards: str = "shards/synthetic"
) -> dict:
    """Samples/s of make finetune's configuration with and without the feature cache (module docstring)."""
    import torch

    from fvl.config import load
    from fvl.data.feature_cache.build import build_features
    from fvl.models import build_model, save_checkpoint
    from fvl.train.run import train

    with tempfile.TemporaryDirectory(prefix="fvl-bench-cache-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        base = [
            f"data.shards={shards}", f"output_dir={root / 'runs'}", f"tracking.uri={uri}",
            f"trainer.max_steps={steps}", "trainer.progress=false", "data.val_samples=0",
            "train.checkpoint_every_n_steps=0",
        ]  # fmt: skip
        cfg = load("finetune", base)
        exp = cfg
        torch.manual_seed(0)
        checkpoint = save_checkpoint(build_model(cfg.model), root / "init.safetensors")
        began = time.perf_counter()
        manifest = build_features(
            checkpoint, shards, root / "cache", exp.data.sources, exp.stage.resize_mode,
            num_workers=exp.data.num_workers,
        )  # fmt: skip
        build_s = time.perf_counter() - began
        samples = sum(s["samples"] for s in manifest["shards"])
        rates: dict[str, list[float]] = {"tower": [], "cache": []}
        for _ in range(repeats):
            for way, extra in (("tower", []), ("cache", [f"data.feature_cache={root / 'cache'}"])):
                result = train(load("finetune", [*base, f"init_from={checkpoint}", *extra]))
                rates[way].append(_samples_per_s(uri, result.mlflow_run_id, warmup))
    tower, cache = statistics.median(rates["tower"]), statistics.median(rates["cache"])
    return {
        "config": "experiments/finetune.yaml",
        "steps": steps,
        "repeats": repeats,
        "batch": exp.data.batch_size,
        "num_workers": exp.data.num_workers,
        "tower_samples_per_s": tower,
        "cache_samples_per_s": cache,
        "runs": rates,
        "speedup": cache / tower,
        "build_seconds": build_s,
        "build_samples": samples,
        "dtype": manifest["identity"]["dtype"],
    }


HEADLINE = ("feature_cache_speedup", "speedup")


def lines(r: dict) -> list[str]:
    return [
        f"feature cache ({r['config']}, batch {r['batch']}, {r['num_workers']} worker, {r['steps']} steps x "
        f"{r['repeats']}): {r['tower_samples_per_s']:.0f} samples/s with the tower, {r['cache_samples_per_s']:.0f} "
        f"with the cache ({r['dtype']}): {r['speedup']:.2f}x; the build took {r['build_seconds']:.0f} s for "
        f"{r['build_samples']} samples ({1000 * r['build_seconds'] / max(1, r['build_samples']):.1f} ms each)"
    ]
