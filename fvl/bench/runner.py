"""Benchmarks (``fvl bench``, ``make bench``): figures with the machine and date, never asserted in tests.

``fvl bench images``: decode + preprocess cost per image (``fvl.bench.images``); ``fvl bench loader``: the
shard reader in-process against a naive decode + resize, and images per second for 1 and 2 DataLoader
workers (``fvl.bench.loader``), for 512 px PNGs and 2250x1500 JPEGs at Florence-2's 768 px.
``fvl bench step``: one training step of the shipped ``florence_vl_3b_finetune`` configuration at real size
(random init) on a GPU, with MFU against a bf16 matmul ceiling measured in the same run (``--tiny``
smoke-tests it on a CPU).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def matmul_ceiling(device: str, n: int = 8192, iters: int = 10) -> float:
    """bf16 matmul FLOP/s of an ``n``^3 product on ``device`` (median of ``iters`` after 3 warm-ups): the
    ceiling MFU is measured against, in the same run."""
    import statistics

    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / statistics.median(_timed(lambda: a @ b, device, iters, warmup=3))


def _timed(fn, device: str, iters: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (CUDA events on a GPU, wall clock elsewhere)."""
    import torch

    times = []
    for i in range(warmup + iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            began = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - began
        if i >= warmup:
            times.append(elapsed)
    return times


def bench_step(
    tiny: bool = False,
    steps: int = 6,
    warmup: int = 3,
    text_tokens: int = 512,
    fsdp: bool = False,
    batch: int = 0,
    overrides: list[str] | None = None,
    cached: bool = False,
    preset: str = "florence_vl_3b_finetune",
) -> dict[str, float]:
    """The shipped ``florence_vl_3b_finetune`` configuration at real size with random init: its precision
    (float32 master weights, frozen tower in bf16, bf16 autocast), gradient checkpointing, optimizer,
    clipping and micro batch; one optimizer step per micro batch. ``tiny=True`` runs the same code on the
    tiny preset (a CPU smoke test). ``fsdp=True`` shards the model with fvl's FSDP2 wrapping over the
    processes started (one without a launcher; ``torchrun`` for more), times the same step, then gathers
    the full state and writes the consolidated safetensors once, as a training run ends. ``batch`` overrides
    the micro batch; ``overrides``: more config overrides (e.g. ``train.optimizer=adamw_fused``).
    ``cached=True`` steps as a run with ``data.feature_cache`` does: the batch carries the images' fused
    features (bf16, computed once beforehand) and the tower never runs. ``preset``: another real-size
    experiment (``florence_vl_8b_finetune``).

    Model FLOPs per step: ``fvl.models.flops`` (the count training logs as ``train/mfu``): linear layers
    6 / 4 / 2 x parameters per real token as they train / pass a gradient / only run forward, attention per
    sample, the tower's forward counted by torch (3x when it trains); recompute left out."""
    import statistics

    import torch

    from fvl.config import load
    from fvl.inputs.collate import Sample, collate
    from fvl.models.flops import FlopCounter
    from fvl.train.module import build_module

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    settings = ["init_from=null", "train.warmup_ratio=0", *(overrides or [])]
    if not tiny:
        settings += ["model.vision.init=random", "model.llm.init=random"]
    cfg = load("finetune" if tiny else preset, settings)
    with torch.device(device):  # random init straight on the device
        module = build_module(cfg)
    module.model.train()
    model = module.model
    autocast = cfg.trainer.precision.startswith("bf16")
    batch = batch or cfg.data.batch_size
    size = model.processor.transform.size  # the decode every tower reads (the largest tower's size)
    conv = [
        {"from": "human", "value": "<image>\n" + "word " * (text_tokens // 2)},
        {"from": "gpt", "value": "word " * (text_tokens // 2)},
    ]
    t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens)
    samples = [Sample(t.input_ids, t.labels, [torch.randn(3, size, size)]) for _ in range(batch)]
    data = {
        k: v.to(device)
        for k, v in collate(samples, model.tokenizer.pad_token_id).items()
        if torch.is_tensor(v)
    }

    # Model FLOPs (fvl.models.flops, the count every training run logs), on the unsharded model.
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)
    if cached:  # the feature cache's batches: fused features in bf16, no pixels
        with torch.no_grad(), amp:
            data["image_features"] = model.fuse_images(data.pop("pixel_values")).to(torch.bfloat16)
    flops = FlopCounter.of(model).batch(data)
    tokens = data["input_ids"].numel()
    world, own_group = (
        _shard(model, device, cfg.trainer.fsdp_gather_dtype, cfg.trainer.fsdp_cpu_offload)
        if fsdp
        else (1, False)
    )
    opt = module.configure_optimizers()["optimizer"]

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(data).loss
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip
            )
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(_timed(step, device, 2 if tiny else steps, 1 if tiny else warmup))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    ceiling = matmul_ceiling(device, 8192 if device == "cuda" else 512, iters=10 if device == "cuda" else 2)
    extra = _consolidate(model) if fsdp else {}
    if own_group:  # a process group this function started ends with it
        import torch.distributed as dist

        dist.destroy_process_group()
    return {
        **extra,
        "strategy": f"fsdp2 over {world} process(es)" if fsdp else "single device",
        "preset": "tiny" if tiny else preset,
        "feature_cache": cached,
        "overrides": list(overrides or []),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "ms_per_step": 1000 * seconds,
        "tokens_per_s": tokens / seconds,
        "peak_gib": peak,
        "batch": batch,
        "seq": data["input_ids"].shape[1],
        "optimizer": cfg.train.optimizer,
        "precision": cfg.trainer.precision,
        "model_tflop_per_step": flops / 1e12,
        "ceiling_tflops": ceiling / 1e12,
        "mfu": flops / seconds / ceiling,
    }


def _shard(model, device: str, gather_dtype: str = "float32", cpu_offload: bool = False) -> tuple[int, bool]:
    """FSDP2 with fvl's units over the processes started (a process group of one without a launcher);
    returns the world size and whether the process group was started here."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fvl.train.strategy import shard_model

    started = not dist.is_initialized()
    if started:
        backend = "nccl" if device == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # a launcher (torchrun) set up the rendezvous
            dist.init_process_group(backend)
        else:  # one process: a private rendezvous, leaving the environment as it was
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    shard_model(model, init_device_mesh(device, (dist.get_world_size(),)), gather_dtype, cpu_offload)
    return dist.get_world_size(), started


def _consolidate(model) -> dict[str, float]:
    """Gather the sharded model's full state (every rank) and write it once as safetensors (rank 0)."""

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fvl.models.checkpoint import save_checkpoint

    began = time.perf_counter()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out: dict[str, float] = {}
    if dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(model, Path(tmp) / "last.safetensors", state_dict=state)
            out["consolidated_gib"] = path.stat().st_size / 2**30
    dist.barrier()
    out["consolidate_s"] = time.perf_counter() - began
    return out


LATEST = Path("benchmarks/latest.json")
# The headline figures the performance work is judged by; each stays null (with why) until measured.
HEADLINES = {
    "feature_extraction_speedup": "not measured yet: fvl bench features [--compile] [--device cuda]",
    "feature_cache_speedup": "the feature cache is not built yet",
    "packing_tokens_per_s_gain": "not measured yet: fvl bench packing",
    "gpu_mfu": "needs a GPU: python -m fvl.bench step (on a CUDA machine)",
    "pretrain_seconds_median": "not measured yet: fvl bench pretrain (three runs of make pretrain's command)",
}


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def record(
    bench: str,
    figures: dict,
    headlines: dict[str, float | None] | None = None,
    path: Path = LATEST,
    stamp: dict[str, str] | None = None,
) -> None:
    """Merge one benchmark's figures (and the headline figures it measured) into ``benchmarks/latest.json``,
    with the date, machine and versions of this run (``stamp``: those of the machine that measured them,
    when that was another one, e.g. a GPU machine's results file); other benchmarks' latest figures stay."""
    latest = json.loads(path.read_text()) if path.exists() else {}
    stamp = stamp or {"date": dt.date.today().isoformat(), "machine": machine(), **versions()}
    latest.setdefault("results", {})[bench] = {**stamp, **figures}
    for key, why in HEADLINES.items():
        latest.setdefault(key, {"value": None, "why": why})
    for key, value in (headlines or {}).items():
        latest[key] = {"value": value, "bench": bench, **stamp}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(latest, indent=1, sort_keys=True) + "\n")


def run(
    which: list[str],
    samples: int = 256,
    tiny: bool = False,
    json_out: str | None = None,
    fsdp: bool = False,
    batch: int = 0,
    device: str = "cpu",
    compile_tower: bool = False,
) -> None:
    """Run the named benchmarks and print their figures under a line with the date and machine."""
    print(f"# {dt.date.today()} on {machine()}")
    if "step" in which:
        r = bench_step(tiny=tiny, fsdp=fsdp, batch=batch)
        print(
            f"step ({'tiny' if tiny else 'florence_vl_3b_finetune, random init'}, {r['strategy']}) on {r['device']}: "
            f"{r['precision']}, {r['optimizer']}, batch {r['batch']} x {r['seq']} tokens: {r['ms_per_step']:.1f} ms/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.1f} GiB, {r['model_tflop_per_step']:.1f} TFLOP/step, "
            f"MFU {r['mfu']:.1%} (fvl.models.flops' count, attention included) of a measured "
            f"{r['ceiling_tflops']:.0f} TFLOP/s bf16 matmul"
        )
        if json_out:
            Path(json_out).write_text(json.dumps(r, indent=1))
        if not tiny:  # the tiny run is a smoke test of the GPU check, not a figure
            record("step", r, {"gpu_mfu": r["mfu"]} if r["device"].startswith("cuda") else None)
    # The others: each fvl.bench.NAME module measures (its runner here picks the arguments), says
    # its figures in ``lines`` and names the headline figure it measures in ``HEADLINE``.
    runners = {
        "images": lambda m: m.bench_images(n=min(samples, 24)),
        "loader": lambda m: m.bench_loader(samples),
        "features": lambda m: m.bench_features(
            arch="base", batch=2, repeats=2, device=device, compile=compile_tower
        ),
        "pretrain": lambda m: m.bench_pretrain(),
        "packing": lambda m: m.bench_packing(),
        "cache": lambda m: m.bench_cache(),
        "towers": lambda m: m.bench_towers(tiny=tiny, device=device),
        "fsdp_plan": lambda m: m.bench_fsdp_plan(),
    }
    for name, runner in runners.items():
        if name not in which:
            continue
        module = importlib.import_module(f"fvl.bench.{name}")
        figures = runner(module)
        for line in module.lines(figures):
            print(line)
        if tiny and name == "towers":
            continue  # the tiny preset's towers: a smoke test, not a figure
        headline = getattr(module, "HEADLINE", None)
        record(name, figures, {headline[0]: figures[headline[1]]} if headline else None)
