"""Benchmarks (``make bench``): figures with the machine and date, never asserted in tests.

``python -m fvl.bench loader``: decode + preprocess throughput of the shard reader at Florence-2's 768 px,
images per second for 1 and 2 DataLoader workers, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def bench_loader(
    samples: int = 256, image_size: int = 768, batch: int = 16, source_px: int = 512
) -> dict[str, float]:
    from fvl.data.pipeline import SampleProcessor, make_dataset
    from fvl.data.recipes import load_recipe
    from fvl.data.shards import build
    from fvl.models.config import LLMConfig
    from fvl.models.llm import llm_tokenizer_path
    from fvl.models.vision.base import IMAGENET_MEAN, IMAGENET_STD
    from fvl.text import get_template, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "r.yaml").write_text(
            f"sources:\n  - {{name: s, format: synthetic, num_samples: {samples}, task: qa, image_size: {source_px}}}\n"
            f"shards: {{samples_per_shard: {max(1, samples // 8)}}}\n"
        )
        manifest = build(load_recipe(root / "r.yaml"), root / "shards", workers=2)
        urls = {"s": [str(root / "shards" / s["path"]) for s in manifest["shards"]]}
        tok = load_tokenizer(llm_tokenizer_path(None, LLMConfig()))
        processor = SampleProcessor(
            tok, get_template("phi3"), 576, image_size, IMAGENET_MEAN, IMAGENET_STD, "pad", 2048
        )
        results = {}
        for workers in (1, 2):
            ds = make_dataset(urls, {"s": 1.0}, processor, batch, tok.pad_token_id, num_workers=workers)
            loader = DataLoader(ds, batch_size=None, num_workers=workers)
            start, n = None, 0
            for i, b in enumerate(loader):
                if i == 0:  # exclude worker start-up
                    start = time.perf_counter()
                    continue
                n += b["pixel_values"].shape[0]
            elapsed = time.perf_counter() - start
            results[f"{workers}_workers_images_per_s"] = n / elapsed
        results["per_worker_images_per_s"] = results["1_workers_images_per_s"]
        return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fvl.bench")
    parser.add_argument("which", nargs="*", default=["loader"], choices=["loader"])
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    print(f"# {dt.date.today()} on {machine()}")
    if "loader" in args.which:
        r = bench_loader(args.samples)
        print(
            f"loader (512 px PNG -> pad -> 768 px normalised): 1 worker {r['1_workers_images_per_s']:.1f} img/s, "
            f"2 workers {r['2_workers_images_per_s']:.1f} img/s"
        )


if __name__ == "__main__":
    main()
