"""The prepared GPU script of issue 28: every variant of the real-size finetune step, one after another, each in
a fresh process (an out-of-memory variant fails alone), with the anchors' vanilla reference first when its
script is given, all in one call of the lent GPU machine.

    python -m fvl.bench.gpu_round2 --out $OUT [--anchor bench_anchor/gpu_anchor.py] [--only LABEL ...]
    python -m fvl.bench.gpu_round2 --tiny --out /tmp/r2     # the same code on the tiny preset, on a CPU

Then padded against packed batches at real size (``fvl.bench.packing``, the recipe-like length mix) under
each attention implementation in ``PACKING``, with the operators that take each step's time.

Each variant is ``fvl.bench.runner.bench_step`` with config overrides; its figures (ms/step, tokens/s, peak
GiB, MFU against a bf16 matmul ceiling measured in the same process) go to ``OUT/round2.json`` as they finish,
so a call that runs out of time keeps what it measured. A variant that needs what the machine lacks
(bitsandbytes, liger-kernel) records the error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (label, overrides, options): what issue 28 asks to measure, the shipped configuration first
VARIANTS: list[tuple[str, list[str], dict]] = [
    ("shipped", [], {}),
    ("cache", [], {"cached": True}),
    ("llm_compiled", ["model.llm.compile=true"], {}),
    ("tower_compiled", ["model.vision.compile=true"], {}),
    ("adamw_8bit", ["train.optimizer=adamw_8bit"], {}),
    ("adamw_8bit_keep24", ["train.optimizer=adamw_8bit", "model.llm.keep_activations=24"], {}),
    ("adamw_8bit_keep32", ["train.optimizer=adamw_8bit", "model.llm.keep_activations=32"], {}),
    (
        "adamw_8bit_keep24_compiled",
        [
            "train.optimizer=adamw_8bit",
            "model.llm.keep_activations=24",
            "model.llm.compile=true",
            "model.vision.compile=true",
        ],
        {},
    ),  # fmt: skip
    ("fused_loss", ["model.llm.loss=fused"], {}),
    ("liger_kernels", ["model.llm.kernels=[rms_norm,swiglu,rope]"], {}),
    (
        "liger_kernels_fused_loss_8bit_keep24",
        [
            "model.llm.kernels=[rms_norm,swiglu,rope]",
            "model.llm.loss=fused",
            "train.optimizer=adamw_8bit",
            "model.llm.keep_activations=24",
        ],
        {},
    ),  # fmt: skip
    ("fsdp_one_gpu", [], {"fsdp": True}),
    (
        "fsdp_one_gpu_bf16_gathers",
        ["trainer.fsdp_gather_dtype=bfloat16", "trainer.precision=bf16-mixed"],
        {"fsdp": True},
    ),  # fmt: skip
    (
        "fsdp_cpu_offload_keep32",
        ["trainer.fsdp_cpu_offload=true", "model.llm.keep_activations=32"],
        {"fsdp": True},
    ),
    ("8b_batch2", ["data.batch_size=2", "train.global_batch_size=2"], {"preset": "florence_vl_8b_finetune"}),
]


# Padded vs packed real tokens/s at real size (the recipe-like length mix of ``fvl.bench.packing``), per
# attention implementation, with the operators that take the time: why packing gains.
PACKING = ["sdpa", "flex_attention", "flash_attention_2"]


def in_fresh_process(module: str, function: str, **kwargs) -> dict:
    """``module.function(**kwargs)`` (JSON-able arguments and result) in a new Python process, so that a
    variant's GPU memory, compiled code and global patches (liger's rotary one) end with it; the result, or
    ``{"error": ...}`` with the last line the process wrote to stderr."""
    code = (
        f"import json; from {module} import {function}; "
        f"print('RESULT ' + json.dumps({function}(**{kwargs!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    found = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode == 0 and found:
        return json.loads(found[-1][len("RESULT ") :])
    return {"error": (res.stderr.strip().splitlines() or ["(no output)"])[-1][:500]}


def run_packing(attention: str, tiny: bool) -> dict:
    return {"attention": attention} | in_fresh_process(
        "fvl.bench.packing", "bench_packing", samples=8 if tiny else 32, repeats=1 if tiny else 3,
        config="tiny" if tiny else "florence_vl_3b_finetune", device="cpu" if tiny else "cuda",
        attention=attention, profile=True,
    )  # fmt: skip


def eval_cost(tiny: bool = False, questions: int = 100, batch_size: int = 32) -> dict:
    """Seconds per ``questions`` synthetic questions of ``eval.during_training`` (``fvl eval``'s ``predict``)
    for the 3B preset at real size, random init, bf16 on the GPU: the figure the README promises. Random
    weights rarely stop early, so answers run to the benchmark's ``max_new_tokens`` (16): an upper bound for
    short-answer benchmarks."""
    import torch

    from fvl.config import load
    from fvl.eval.benchmarks import resolve_benchmark
    from fvl.eval.evaluate import predict
    from fvl.models import build_model

    device = "cpu" if tiny else "cuda"
    overrides = [] if tiny else ["model.vision.init=random", "model.llm.init=random"]
    cfg = load("tiny" if tiny else "florence_vl_3b", [*overrides, "stage=finetune"])
    with torch.device(device):
        model = build_model(cfg.model)
    model = model.to(torch.float32 if tiny else torch.bfloat16).eval()
    bench = resolve_benchmark("synthetic", questions)
    predict(model, bench.samples[:batch_size], bench.spec.max_new_tokens, batch_size)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    answers = predict(model, bench.samples, bench.spec.max_new_tokens, batch_size)
    sync()
    seconds = time.perf_counter() - began
    return {"questions": len(answers), "batch_size": batch_size, "max_new_tokens": bench.spec.max_new_tokens,
            "seconds": seconds, "seconds_per_100": 100 * seconds / len(answers), "device": device}  # fmt: skip


def kernel_equivalence(model_type: str, device: str = "cuda") -> dict:
    """Each liger kernel against the eager layers on the GPU (Triton has no CPU path): a 2-layer random LLM of
    ``model_type`` in float32, forward and backward on the same ids with and without the kernel; the largest
    relative differences of the logits and of the gradients. Eager references come first: liger's rotary
    patch is module-level and would reach them too."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fvl.models.kernels import KERNELS, apply_kernels

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, pad_token_id=0)  # fmt: skip
    base = AutoModelForCausalLM.from_config(config).to(device).float()
    ids = torch.randint(0, 1024, (2, 128), device=device)

    def run(model):
        model.zero_grad()
        logits = model(ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    copies = {k: copy.deepcopy(base) for k in KERNELS}
    reference = run(base)
    out = {}
    for kernel in KERNELS:  # rope last: its patch is global
        apply_kernels(copies[kernel], [kernel])
        logits, grads = run(copies[kernel])
        rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-12))  # noqa: E731
        out[kernel] = {
            "logits_rel_diff": rel(logits, reference[0]),
            "grads_max_rel_diff": max(rel(grads[n], g) for n, g in reference[1].items()),
        }
    return out


def run_variant(label: str, overrides: list[str], options: dict, tiny: bool) -> dict:
    """One variant in a fresh Python process; its figures, or the error it ended with."""
    kwargs = {k: v for k, v in options.items() if not (tiny and k == "preset")}
    began = time.perf_counter()
    result = in_fresh_process("fvl.bench.runner", "bench_step", tiny=tiny, overrides=overrides, **kwargs)
    out = {"label": label, "overrides": overrides, **options, **result}
    out["wall_s"] = time.perf_counter() - began
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for round2.json (and the anchor's output)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on a CPU: a smoke test")
    parser.add_argument("--anchor", default="", help="path of the anchors' gpu_anchor.py, run first")
    parser.add_argument("--only", nargs="*", default=[], help="labels to run (default: all)")
    parser.add_argument("--packing", nargs="*", default=None, help="attention implementations for the packing "
                        "runs (default: all of PACKING; none with --only)")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"variants": []}
    if args.anchor:
        res = subprocess.run([sys.executable, args.anchor, *(["--tiny"] if args.tiny else [])],
                             capture_output=True, text=True)  # fmt: skip
        (out / "anchor.txt").write_text(res.stdout + res.stderr)
        results["anchor_returncode"] = res.returncode
    if not args.only:  # the kernels' equivalence first: a variant using them means little without it
        for model_type in ("phi3", "llama"):
            results[f"kernels_{model_type}"] = in_fresh_process(
                "fvl.bench.gpu_round2", "kernel_equivalence", model_type=model_type
            )
            print(f"kernels {model_type}: {results[f'kernels_{model_type}']}", flush=True)
    unknown = set(args.only) - {label for label, _, _ in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    for label, overrides, options in VARIANTS:
        if args.only and label not in args.only:
            continue
        r = run_variant(label, overrides, options, args.tiny)
        results["variants"].append(r)
        (out / "round2.json").write_text(json.dumps(results, indent=1))
        shown = (f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.1f} GiB, "
                 f"MFU {r['mfu']:.1%}") if "mfu" in r else f"error: {r['error']}"  # fmt: skip
        print(f"{label}: {shown} ({r['wall_s']:.0f} s)", flush=True)
    if not args.only:  # what a benchmark score while training costs on the GPU (README)
        small = {"questions": 8, "batch_size": 4} if args.tiny else {}
        results["eval_cost"] = in_fresh_process("fvl.bench.gpu_round2", "eval_cost", tiny=args.tiny, **small)
        (out / "round2.json").write_text(json.dumps(results, indent=1))
        print(f"eval cost: {results['eval_cost']}", flush=True)
    packing = args.packing if args.packing is not None else ([] if args.only else PACKING)
    for attention in packing:
        r = run_packing(attention, args.tiny)
        results.setdefault("packing", []).append(r)
        (out / "round2.json").write_text(json.dumps(results, indent=1))
        shown = (
            f"{r['tokens_per_s_gain']:.2f}x packed vs padded"
            if "tokens_per_s_gain" in r
            else f"error: {r['error']}"
        )
        print(f"packing, {attention}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
