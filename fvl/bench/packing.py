"""Padding-free packing against padded batches, side by side in one run: ``bench_packing()``.

Samples with LLaVA-like lengths (one image of 576 tokens plus 20-1500 text tokens, drawn with a fixed
seed) go through a training step (forward, backward, optimizer) of the tiny preset with its tower at 384 px
(576 tokens an image), once as padded batches and once packed into rows of ``max_length``. Both see the
same samples in the same batches; the figures are real (non-padding) tokens per second and the padding
fraction, medians over the repeats, the two ways taking turns.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "left",
    "right",
    "above",
    "below",
    "the",
    "a",
    "of",
    "and",
    "is",
]


def _samples(processor, n: int, seed: int) -> list:
    from fvl.synthetic import generate

    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = generate(i)
        words = rng.randint(10, 750)  # about 20-1500 tokens of text with the tiny tokenizer
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        conv = [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": answer},
        ]
        out.append(processor(conv, [s.image], s.id))
    return out


def _step_time(model, optimizer, batch, device: str) -> float:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
        loss = model(batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _model_config(config: str, max_length: int, attention: str = ""):
    """The model of ``config``: the tiny preset with its tower at 384 px (576 tokens an image, as the real
    presets have), or a shipped experiment at real size with random init."""
    from fvl.config import load

    if config == "tiny":
        overrides = [
            "model.vision.image_size=384",
            "model.vision.arch.text_config.max_position_embeddings=1024",
            f"model.llm.arch.max_position_embeddings={2 * max_length}",
        ]
    else:
        overrides = ["model.vision.init=random", "model.llm.init=random", "init_from=null"]
    if attention:
        overrides.append(f"model.llm.attn_implementation={attention}")
    return load(config, [*overrides, f"model.text.max_length={max_length}"]).model


def bench_packing(
    samples: int = 32,
    batch: int = 8,
    repeats: int = 3,
    max_length: int = 2048,
    config: str = "tiny",
    device: str = "cpu",
    attention: str = "",
    profile: bool = False,
) -> dict:
    """Tokens per second and padding fraction, padded vs packed (see the module docstring). ``config``:
    ``tiny`` or a shipped experiment (``florence_vl_3b_finetune``: real size, random init, bf16 autocast
    on a GPU, its attention implementation and checkpointing). ``attention``: another
    ``model.llm.attn_implementation`` (``flex_attention``, ``flash_attention_2``: kernels that skip the
    blocks a packed row's document mask leaves out; SDPA with a mask computes them). ``profile``: also the
    ten operators that take the most time in one step of each way (``profile`` in the result), to say where
    a gain comes from."""
    from fvl.data.packing import collate_packed
    from fvl.inputs.collate import collate
    from fvl.models import build_model

    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(_model_config(config, max_length, attention)).train()
    processor = model.processor.with_resize_mode("pad")
    data = _samples(processor, samples, seed=0)
    groups = [data[i : i + batch] for i in range(0, len(data), batch)]
    ways = {
        "padded": [collate(g, processor.pad_token_id) for g in groups],
        "packed": [collate_packed(g, max_length, processor.pad_token_id) for g in groups],
    }
    ways = {w: [_to(b, device) for b in batches] for w, batches in ways.items()}
    tokens = sum(len(s.input_ids) for s in data)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    _step_time(model, optimizer, ways["padded"][0], device)  # warm-up
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(repeats):
        for way, batches in ways.items():
            seconds[way].append(sum(_step_time(model, optimizer, b, device) for b in batches))
    out: dict = {"samples": samples, "batch": batch, "max_length": max_length, "repeats": repeats}
    out |= {"config": config, "device": device, "attention": model.cfg.llm.attn_implementation}
    for way, batches in ways.items():
        cells = sum(b["input_ids"].numel() for b in batches)
        out[way] = {
            "tokens_per_s": tokens / statistics.median(seconds[way]),
            "padding_fraction": 1 - tokens / cells,
            "rows": sum(b["input_ids"].shape[0] for b in batches),
        }
    out["tokens_per_s_gain"] = statistics.median(
        p / q for p, q in zip(seconds["padded"], seconds["packed"], strict=True)
    )
    if profile:
        out["profile"] = {
            way: _top_ops(model, optimizer, batches[0], device) for way, batches in ways.items()
        }
    return out


def _top_ops(model, optimizer, batch: dict, device: str, n: int = 10) -> list[dict]:
    """The ``n`` operators with the most self time in one step (CUDA time on a GPU, CPU time elsewhere)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        _step_time(model, optimizer, batch, device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return [{"op": e.key, "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in events]


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "ids"}


HEADLINE = ("packing_tokens_per_s_gain", "tokens_per_s_gain")


def lines(r: dict) -> list[str]:
    padded, packed = r["padded"], r["packed"]
    return [
        f"packing ({r.get('config', 'tiny')} on {r.get('device', 'cpu')}, {r.get('attention', 'sdpa')}, 576 image + "
        f"20-1500 text tokens, batch {r['batch']}, rows of {r['max_length']}): padded "
        f"{padded['tokens_per_s']:.0f} tokens/s, padding {padded['padding_fraction']:.1%}; packed "
        f"{packed['tokens_per_s']:.0f} tokens/s, padding {packed['padding_fraction']:.1%}: "
        f"{r['tokens_per_s_gain']:.2f}x"
    ]
