"""A model of an FSDP2 training step on many GPUs (``fvl bench fsdp_plan``): what each rank gathers and
reduce-scatters per step, how long that takes at NVLink and InfiniBand bandwidths, how much of it hides
behind compute, and the MFU that follows. Arithmetic, not a measurement: no machine here has two GPUs.

What fvl's FSDP2 does (``fvl.train.strategy.shard_model``): every repeated block (decoder layer, tower
block) is a unit, the rest of the model the root unit; parameters are gathered in their storage dtype
(float32 master weights for what trains, bf16 for a frozen tower) before each unit's forward, freed after
it (``reshard_after_forward``), gathered again for its backward, and the float32 gradients are
reduce-scattered after it. Per micro batch and rank, with ``W`` ranks, a ring collective moves ``(W - 1) /
W`` of the tensor's bytes in and out of each rank:

- all-gather, forward: every parameter (trainable x 4 bytes + frozen x 2);
- all-gather, backward: the parameters that backward runs through (the trainable ones; a frozen tower
  in front of everything runs no backward);
- reduce-scatter: the trainable parameters' gradients x 4 bytes, every micro batch unless gradient
  synchronisation is deferred to the accumulation's last one (``sync_every_micro_batch=False``).

Compute per sample comes from measured single-GPU figures (``COMPUTE_MS_PER_SAMPLE``: BENCHMARKS.md's H100
anchors, the 8B scaled by its FLOPs), without gradient checkpointing (sharded 1/W, the 61 GB of master
weights, gradients and AdamW moments no longer crowd the activations out) and with the optimizer's step
divided by W and spread over the accumulation. FSDP2 prefetches the next unit's all-gather while the current
one computes: a step takes ``max(compute, communication)`` plus the part that cannot overlap (the first
unit's gather and the last reduce-scatter: ``exposed_fraction`` of the communication).
"""

from __future__ import annotations

from dataclasses import dataclass

# Achievable collective bandwidth per rank (bytes/s). NVLink 4 on an H100 SXM node: 450 GB/s per direction,
# of which NCCL's all-gather / reduce-scatter reach ~80 % on 8 GPUs. 400 Gb/s InfiniBand, one NIC per GPU:
# 50 GB/s, ~90 % reached; a ring across nodes runs at the slowest link, the NIC.
LINKS: dict[str, float] = {"nvlink": 360e9, "ib400": 45e9}
PEAK = 792e12  # the bf16 8192^3 matmul ceiling measured on the H100 (perf anchors): MFU's denominator here

# Measured on one H100 (BENCHMARKS.md, 2026-11-26): the vanilla Phi-3.5-mini forward + backward of 8 x 1088
# tokens, and the frozen Florence-2-large tower for 8 images at 768 px. The 8B: the same rate of model FLOPs.
COMPUTE_MS_PER_SAMPLE = {"florence_vl_3b": (523.7 + 94.0) / 8}
OPTIMIZER_MS_PER_BILLION = 60.0 / 3.84  # fused AdamW over float32 master weights, measured: 60 ms for 3.84B


@dataclass(frozen=True)
class Model:
    """Parameter counts (billions), and model FLOPs and compute time per sample, of one preset's finetune
    step (one sample: 576 image tokens and 512 of text)."""

    name: str
    trainable_b: float
    frozen_b: float
    flops_per_sample: float
    compute_ms_per_sample: float


@dataclass(frozen=True)
class StepPlan:
    model: str
    world: int
    link: str
    variant: str  # how parameters are gathered and when gradients are reduce-scattered
    accumulation: int
    gather_gb: float  # per rank per micro batch, in and out
    reduce_gb: float  # per rank per optimizer step
    compute_ms: float  # per optimizer step
    comm_ms: float  # per optimizer step
    step_ms: float
    mfu: float


def plan(
    model: Model,
    world: int,
    link: str,
    global_batch: int,
    micro_batch: int = 8,
    gather_bytes_trainable: int = 4,
    sync_every_micro_batch: bool = True,
    exposed_fraction: float = 0.1,
    hsdp_node: int = 0,
) -> StepPlan:
    """One optimizer step of ``model`` on ``world`` GPUs joined by ``link`` (see the module docstring).
    ``gather_bytes_trainable=2``: a bf16 ``param_dtype`` in FSDP2's mixed-precision policy (gathers halve).
    The micro batch shrinks when the global batch leaves a rank fewer samples than ``micro_batch``.
    ``hsdp_node=8``: hybrid sharding (FSDP2's 2-D mesh), sharded within each node of 8 GPUs over NVLink and
    replicated across nodes, which then all-reduce the gradient shards (once per step) over ``link``."""
    micro_batch = min(micro_batch, global_batch // world)
    if micro_batch < 1 or global_batch % (world * micro_batch):
        raise ValueError(f"global batch {global_batch} does not split over {world} ranks in micro batches")
    accumulation = global_batch // (world * micro_batch)
    ring = (world - 1) / world
    gb = 1e9
    forward = (model.trainable_b * gather_bytes_trainable + model.frozen_b * 2) * gb
    backward = model.trainable_b * gather_bytes_trainable * gb
    syncs = accumulation if sync_every_micro_batch else 1
    if hsdp_node:
        inner = (hsdp_node - 1) / hsdp_node
        nodes = world // hsdp_node
        gather = inner * (forward + backward)
        reduce = inner * model.trainable_b * 4 * gb * syncs
        across = 2 * (nodes - 1) / nodes * model.trainable_b * 4 * gb / hsdp_node  # all-reduce of one shard
        comm = (gather * accumulation + reduce) / LINKS["nvlink"] + across / LINKS[link]
        reduce += across
    else:
        gather = ring * (forward + backward)  # per micro batch
        reduce = ring * model.trainable_b * 4 * gb * syncs
        comm = (gather * accumulation + reduce) / LINKS[link]
    samples = accumulation * micro_batch
    optimizer = OPTIMIZER_MS_PER_BILLION * model.trainable_b / world / 1e3  # each rank steps its shard
    compute = samples * model.compute_ms_per_sample / 1e3 + optimizer
    step = max(compute, comm) + exposed_fraction * min(compute, comm)
    mfu = samples * model.flops_per_sample / step / PEAK
    variant = (
        f"{'HSDP (8 per node), ' if hsdp_node else ''}{'bf16' if gather_bytes_trainable == 2 else 'fp32'} "
        f"gathers, {'reduce every micro batch' if sync_every_micro_batch else 'one reduce per step'}"
    )
    return StepPlan(model.name, world, link, variant, accumulation, gather / gb, reduce / gb, 1e3 * compute, 1e3 * comm,
                    1e3 * step, mfu)  # fmt: skip


def preset_model(name: str, text_tokens: int = 512) -> Model:
    """The finetune step's parameter counts and model FLOPs of a real-size preset, built on the meta device
    (``fvl.models.flops``'s count without the tower, plus the tower's measured forward for the 3B)."""
    import torch

    from fvl.config import load
    from fvl.models import build_model, set_trainable

    cfg = load(name, ["model.vision.init=random", "model.llm.init=random", "stage=finetune"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = set_trainable(model, cfg.stage.trainable)
    trainable = sum(c["trainable"] for k, c in counts.items() if "." not in k)
    frozen = sum(c["frozen"] + c["unused"] for k, c in counts.items() if "." not in k)
    embedding = model.llm.get_input_embeddings().weight.numel()
    llm = model.llm.config
    tokens = model.num_image_tokens + text_tokens
    per_sample = (
        6 * (trainable - embedding) * tokens + 12 * llm.num_hidden_layers * llm.hidden_size * tokens**2
    )
    flops = per_sample + 2.0e12  # + Florence-2-large's four features, forward (fvl bench towers: 2006 GFLOP)
    ms = COMPUTE_MS_PER_SAMPLE.get(name)
    if ms is None:  # the same achieved FLOP rate as the measured 3B step
        reference = preset_model("florence_vl_3b", text_tokens)
        ms = reference.compute_ms_per_sample * flops / reference.flops_per_sample
    return Model(name, trainable / 1e9, frozen / 1e9, flops, ms)


def table(models: list[Model], global_batches: dict[str, int]) -> list[StepPlan]:
    """The plans BENCHMARKS.md shows: each model on 8 and 64 GPUs, NVLink within a node, InfiniBand
    across nodes, as fvl shards today, with bf16 gathers and one reduce-scatter per step, and (64 GPUs)
    hybrid sharding within nodes."""
    out = []
    for m in models:
        batch = global_batches[m.name]
        for world, link in ((8, "nvlink"), (64, "ib400")):
            out.append(plan(m, world, link, batch))
            out.append(plan(m, world, link, batch, gather_bytes_trainable=2, sync_every_micro_batch=False))
            if world > 8:
                out.append(plan(m, world, link, batch, gather_bytes_trainable=2, sync_every_micro_batch=False,
                                hsdp_node=8))  # fmt: skip
    return out


GLOBAL_BATCHES = {"florence_vl_3b": 2048, "florence_vl_8b": 256}  # the paper's finetune settings


def bench_fsdp_plan() -> dict:
    """The table for BENCHMARKS.md (``fvl bench fsdp_plan``): the 3B and 8B finetune steps on 8 and 64 GPUs."""
    import dataclasses

    models = [preset_model(name) for name in GLOBAL_BATCHES]
    return {
        "models": [dataclasses.asdict(m) for m in models],
        "plans": [dataclasses.asdict(p) for p in table(models, GLOBAL_BATCHES)],
        "links_bytes_per_s": dict(LINKS),
        "peak_flops": PEAK,
    }


def lines(r: dict) -> list[str]:
    return table_lines([StepPlan(**p) for p in r["plans"]])


def table_lines(plans: list[StepPlan]) -> list[str]:
    out = ["| model | GPUs, link | variant | accumulation | gathered GB / micro batch | reduced GB / step | "
           "compute s | communication s | step s | MFU |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in plans:
        out.append(
            f"| {p.model} | {p.world}, {p.link} | {p.variant} | {p.accumulation} | {p.gather_gb:.1f} | {p.reduce_gb:.1f} | "
            f"{p.compute_ms / 1e3:.2f} | {p.comm_ms / 1e3:.2f} | {p.step_ms / 1e3:.2f} | {p.mfu:.1%} |"
        )
    return out
