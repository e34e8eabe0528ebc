"""Benchmarks (``make bench``): figures with the machine and date, never asserted in tests.

``python -m fvl.bench loader``: decode + preprocess throughput of the shard reader at Florence-2's 768 px,
images per second for 1 and 2 DataLoader workers, measured side by side in one run.
``python -m fvl.bench finetune-step``: the training issue's GPU check (``--tiny`` smoke-tests it on a CPU).
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


def bench_finetune_step(
    tiny: bool = False, steps: int = 5, batch: int = 4, text_tokens: int = 512
) -> dict[str, float]:
    """One ``florence_vl_3b`` finetune configuration at real size with random init (the training issue's GPU
    check): bf16 autocast, gradient checkpointing, 8-bit AdamW; median step time and peak memory.
    ``tiny=True`` runs the same code on the tiny preset (a CPU smoke test of the script)."""
    import statistics

    import torch

    from fvl.config import EXPERIMENTS_DIR, load
    from fvl.data.collate import Sample, collate
    from fvl.train.module import STAGE_MODULES

    exp = EXPERIMENTS_DIR / ("finetune.yaml" if tiny else "florence_vl_3b_finetune.yaml")
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
    module = STAGE_MODULES.get("finetune")(cfg).to(device)
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fvl.bench")
    parser.add_argument("which", nargs="*", default=["loader"], choices=["loader", "finetune-step"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument(
        "--tiny", action="store_true", help="finetune-step on the tiny preset (CPU smoke test)"
    )
    args = parser.parse_args()
    print(f"# {dt.date.today()} on {machine()}")
    if "finetune-step" in args.which:
        r = bench_finetune_step(tiny=args.tiny)
        print(
            f"finetune step ({'tiny' if args.tiny else 'florence_vl_3b random init'}, bf16 autocast, gradient checkpointing, "
            f"8-bit AdamW, batch {r['batch']} x {r['tokens']} tokens): {r['ms_per_step']:.1f} ms/step, peak {r['peak_gib']:.1f} GiB"
        )
    if "loader" in args.which:
        r = bench_loader(args.samples)
        print(
            f"loader (512 px PNG -> pad -> 768 px normalised): 1 worker {r['1_workers_images_per_s']:.1f} img/s, "
            f"2 workers {r['2_workers_images_per_s']:.1f} img/s"
        )


if __name__ == "__main__":
    main()
