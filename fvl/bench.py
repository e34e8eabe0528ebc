"""Benchmarks (``fvl bench``, ``make bench``): figures with the machine and date, never asserted in tests.

``fvl bench loader``: decode + preprocess throughput of the shard reader at Florence-2's 768 px, images per
second for 1 and 2 DataLoader workers, measured side by side in one run.
``fvl bench finetune-step``: the training issue's GPU check (``--tiny`` smoke-tests it on a CPU).
"""

from __future__ import annotations

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
    from fvl.config import load
    from fvl.data.config import DataConfig
    from fvl.data.datamodule import shard_set
    from fvl.data.pipeline import make_dataset
    from fvl.data.recipes import load_recipe
    from fvl.data.shards import build
    from fvl.models import build_processor

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "r.yaml").write_text(
            f"sources:\n  - {{name: s, format: synthetic, num_samples: {samples}, task: qa, image_size: {source_px}}}\n"
            f"shards: {{samples_per_shard: {max(1, samples // 8)}}}\n"
        )
        manifest = build(load_recipe(root / "r.yaml"), root / "shards", workers=2)
        shards = shard_set(root / "shards", manifest)
        # The tiny preset's tower at 768 px has the real presets' 576 tokens; the tokenizer is the tiny one.
        model_cfg = load(
            "tiny", [f"model.vision.image_size={image_size}", "model.text.max_length=2048"]
        ).model
        processor = build_processor(model_cfg, "pad")
        results = {}
        for workers in (1, 2):
            data_cfg = DataConfig(batch_size=batch, num_workers=workers, shuffle_buffer=0, resampled=False)
            ds = make_dataset(data_cfg, shards, processor)
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


def bench_finetune_step(
    tiny: bool = False, steps: int = 5, batch: int = 4, text_tokens: int = 512
) -> dict[str, float]:
    """One ``florence_vl_3b`` finetune configuration at real size with random init (the training issue's GPU
    check): bf16 autocast, gradient checkpointing, 8-bit AdamW; median step time and peak memory.
    ``tiny=True`` runs the same code on the tiny preset (a CPU smoke test of the script)."""
    import statistics

    import torch

    from fvl.config import load
    from fvl.data.collate import Sample, collate
    from fvl.train.module import build_module

    exp = "finetune" if tiny else "florence_vl_3b_finetune"
    overrides = [
        "init_from=null",
        "model.llm.gradient_checkpointing=true",
        "train.optimizer=adamw_8bit",
        "train.warmup_ratio=0",
    ]
    if not tiny:
        overrides += ["model.vision.init=random", "model.llm.init=random", "model.llm.dtype=float32"]
    cfg = load(exp, overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = build_module(cfg).to(device)
    module.model.train()
    opt = module.configure_optimizers()["optimizer"]
    m = module.model
    size = m.vision.image_size
    conv = [
        {"from": "human", "value": "<image>\n" + "word " * (text_tokens // 2)},
        {"from": "gpt", "value": "word " * (text_tokens // 2)},
    ]
    t = m.template.tokenize(conv, m.tokenizer, m.num_image_tokens)
    samples = [Sample(t.input_ids, t.labels, [torch.randn(3, size, size)]) for _ in range(batch)]
    data = {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in collate(samples, m.tokenizer.pad_token_id).items()
    }
    data.pop("ids")
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = m(data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"ms_per_step": 1000 * statistics.median(times), "peak_gib": peak, "tokens": data["input_ids"].shape[1],
            "batch": batch, "loss": float(loss)}  # fmt: skip


def run(which: list[str], samples: int = 256, tiny: bool = False) -> None:
    """Run the named benchmarks and print their figures under a line with the date and machine."""
    print(f"# {dt.date.today()} on {machine()}")
    if "finetune-step" in which:
        r = bench_finetune_step(tiny=tiny)
        print(
            f"finetune step ({'tiny' if tiny else 'florence_vl_3b random init'}, bf16 autocast, gradient checkpointing, "
            f"8-bit AdamW, batch {r['batch']} x {r['tokens']} tokens): {r['ms_per_step']:.1f} ms/step, peak {r['peak_gib']:.1f} GiB"
        )
    if "loader" in which:
        r = bench_loader(samples)
        print(
            f"loader (512 px PNG -> pad -> 768 px normalised): 1 worker {r['1_workers_images_per_s']:.1f} img/s, "
            f"2 workers {r['2_workers_images_per_s']:.1f} img/s"
        )
