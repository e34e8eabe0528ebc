"""The shard reader's throughput, side by side in one run: ``bench_loader()``.

Two llava_json sources are written to a temporary folder and built into shards: 512x512 PNGs and 2250x1500
JPEG photos (photo-like content, quality 90). For each, at ``size`` px in ``pad`` mode (the finetune
stage's transform) with the tiny preset's tokenizer:

- ``in_process_ms``: ms per sample through ``ShardReader`` in this process (span read, tar parse, JSON, one
  decode at the needed scale, tokenisation), against ``naive_ms``: ``Image.open(f).convert("RGB")
  .resize((size, size))`` over the same source files, taking turns within each repeat;
- ``images_per_s`` with 1 and 2 DataLoader workers through ``PlannedLoader`` (start-up excluded).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from fvl.bench.images import JPEG_QUALITY, photo_like

KINDS = {"png_512": ((512, 512), "png"), "jpeg_2250x1500": ((2250, 1500), "jpg")}


def _write_source(root: Path, kind: str, n: int) -> list[Path]:
    (width, height), ext = KINDS[kind]
    folder = root / kind
    folder.mkdir()
    files, items = [], []
    for i in range(n):
        path = folder / f"{i}.{ext}"
        photo_like(width, height, seed=i).save(path, **({"quality": JPEG_QUALITY} if ext == "jpg" else {}))
        files.append(path)
        items.append({"id": f"{kind}-{i}", "image": path.name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "Colour blobs under a light gradient."},
        ]})  # fmt: skip
    (root / f"{kind}.json").write_text(json.dumps(items))
    return files


def _naive(files: list[Path], size: int) -> float:
    start = time.perf_counter()
    for f in files:
        Image.open(f).convert("RGB").resize((size, size))
    return (time.perf_counter() - start) * 1000 / len(files)


def _in_process(reader, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        reader.sample(i)
    return (time.perf_counter() - start) * 1000 / n


def _images_per_s(reader, catalog, workers: int, batch: int) -> float:
    from fvl.data.plan import EpochBatches, PlanSettings
    from fvl.data.reader import PlannedLoader

    plan = EpochBatches(
        catalog.sources, PlanSettings(0, {}, 1, 0, batch), catalog.text_len, catalog.images > 0
    )
    start, n = None, 0
    for i, b in enumerate(PlannedLoader(reader, plan, num_workers=workers)):
        if i == 0:  # exclude worker start-up
            start = time.perf_counter()
            continue
        n += b["pixel_values"].shape[0]
    return n / (time.perf_counter() - start)


def bench_loader(samples: int = 64, size: int = 768, batch: int = 8, repeats: int = 3) -> dict:
    """Figures per image kind (see the module docstring); prints nothing."""
    from fvl.config import load
    from fvl.data.reader import Catalog, ShardReader
    from fvl.data.recipes import load_recipe
    from fvl.data.shards import build
    from fvl.data.shardset import shard_set
    from fvl.models import build_processor

    # The tiny preset with its tower at 768 px (2304 tokens an image); the tokenizer is the tiny one.
    processor = build_processor(
        load("tiny", [f"model.vision.image_size={size}", "model.text.max_length=4096"]).model, "pad"
    )
    results: dict = {"samples": samples, "size": size, "batch": batch, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="fvl-bench-loader-") as tmp:
        root = Path(tmp)
        files = {kind: _write_source(root, kind, samples) for kind in KINDS}
        (root / "r.yaml").write_text(
            "sources:\n"
            + "".join(
                f"  - {{name: {k}, format: llava_json, annotations: {k}.json, image_root: {k}}}\n"
                for k in KINDS
            )
            + f"shards: {{samples_per_shard: {max(1, samples // 4)}}}\n"
        )
        manifest = build(load_recipe(root / "r.yaml"), root / "shards", workers=2)
        for kind in KINDS:
            shards = shard_set(root / "shards", manifest, [kind])
            catalog = Catalog.build(shards.urls, shards.shard_samples)
            reader = ShardReader(catalog, processor)
            naive, ours = [], []
            for _ in range(repeats):  # taking turns, so that machine noise falls on both alike
                naive.append(_naive(files[kind], size))
                ours.append(_in_process(reader, len(catalog)))
            results[kind] = {
                "naive_ms": statistics.median(naive),
                "in_process_ms": statistics.median(ours),
                "in_process_vs_naive": statistics.median(o / n for o, n in zip(ours, naive, strict=True)),
                **{f"{w}_workers_images_per_s": _images_per_s(reader, catalog, w, batch) for w in (1, 2)},
            }
    return results


def lines(r: dict) -> list[str]:
    """The figures of ``bench_loader``, a line per image kind."""
    return [
        f"loader {kind} -> pad {r['size']} px uint8: in-process {f['in_process_ms']:.1f} ms/sample vs naive "
        f"decode+resize {f['naive_ms']:.1f} ms ({f['in_process_vs_naive']:.2f}x); 1 worker "
        f"{f['1_workers_images_per_s']:.1f} img/s, 2 workers {f['2_workers_images_per_s']:.1f} img/s"
        for kind, f in ((k, r[k]) for k in KINDS)
    ]
