"""``fvl bench``: the benchmarks behind BENCHMARKS.md (``fvl.bench``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchArgs:
    """Benchmarks with the machine and date (figures, never asserted in tests).

    which: images (decode + preprocess per image at 768 px), loader (the shard reader in-process and with
      workers, PNGs and JPEG photos), packing (padded vs packed training steps at LLaVA-like lengths),
      cache (make finetune's configuration with and without a feature cache, samples/s), features (Florence-2 feature extraction, fvl's way vs a full forward per prompt, at base size; the
      large size on a GPU), towers (each tower of Florence-2 + SigLIP-so400m per image: ms, GFLOPs, tokens,
      channels; --tiny for the tiny preset's), fsdp_plan (a model of the 3B and 8B FSDP2 steps on 8 and 64
      GPUs: bytes gathered and reduced, time at NVLink and InfiniBand, MFU; arithmetic), pretrain (the median of three runs of make pretrain's command, shard build
      included) and / or step (a training step of the shipped 3B finetune configuration at real size, with
      MFU; a GPU check). Each writes its figures into benchmarks/latest.json.
    samples: images per kind for the loader benchmark (at most 24 for images).
    tiny: run step and towers on the tiny preset (a CPU smoke test of the GPU check).
    json: write the step figures to this JSON file too.
    fsdp: run step under fvl's FSDP2 sharding (over the processes torchrun starts; one without it) and
      consolidate the final safetensors.
    batch: micro batch of step (0: the configuration's).
    device: where features and towers run (``cuda`` on a GPU machine).
    compile: features with the tower compiled (model.vision.compile).
    """

    which: list[str] = field(
        default_factory=lambda: ["images", "loader", "packing"],
        metadata={
            "positional": True,
            "choices": (
                "images",
                "loader",
                "packing",
                "cache",
                "features",
                "towers",
                "fsdp_plan",
                "pretrain",
                "step",
            ),
        },
    )
    samples: int = 64
    tiny: bool = False
    json: str | None = None
    fsdp: bool = False
    batch: int = 0
    device: str = "cpu"
    compile: bool = False


def bench(args: BenchArgs) -> int:
    from fvl.bench.runner import run

    run(args.which, args.samples, args.tiny, args.json, args.fsdp, args.batch, args.device, args.compile)
    return 0
