"""What each tower of a model costs per image: ``bench_towers()`` (``fvl bench towers``).

The model is the 3B preset with ``experiments/fusion/florence2_siglip.yaml`` (Florence-2-large at 768 px and
SigLIP-so400m at 384 px), random init at real size (no download); ``tiny=True`` takes the tiny preset with
the same fusion file (a seconds-long smoke test of the same code). Each tower's feature extraction (the
features the fusion reads, on the tower's own input made from one shared decode) is timed per image, with
its forward FLOPs counted by torch, its token grid, its channels, and the grid alignment's cost. The towers
take turns within each repeat, so machine noise falls on all alike; figures are medians after a warm-up.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fvl.bench.features import timed_alternating
from fvl.models.vision.towers import align_grid, by_tower

FUSION = "fusion/florence2_siglip.yaml"


def bench_towers(tiny: bool = False, batch: int = 2, repeats: int = 3, device: str = "cpu") -> dict:
    """Per tower: ms and forward GFLOPs per image, tokens per image and channels of the fused features."""
    from fvl.config import load
    from fvl.models import build_model
    from fvl.util import resources

    fusion = resources.find("experiments", FUSION)
    overrides = [f"model.fusion.features={_features(fusion)}"]
    if not tiny:
        overrides += [
            "model.vision.init=random",
            "model.llm.init=random",
            "model.vision.towers.siglip.init=random",
            "model.llm.arch.num_hidden_layers=1",
        ]  # fmt: skip - the LLM is not measured here
    cfg = load("tiny" if tiny else "florence_vl_3b", overrides).model
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build_model(cfg).to(device, dtype).eval()
    size = model.processor.transform.size
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    wanted = by_tower(cfg.vision, model.fusion.names)

    def features_of(key: str):  # one tower's features, on its own grid (the alignment is timed apart)
        return model.tower_features(pixels, [name for name, _ in wanted[key]], aligned=False)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    figures: dict[str, dict] = {}
    with torch.inference_mode():
        outputs = {key: features_of(key) for key in wanted}  # warm-up
        for key in wanted:
            with FlopCounterMode(display=False) as counter:
                features_of(key)
            out = next(iter(outputs[key].values()))
            began = time.perf_counter()
            for f in outputs[key].values():
                align_grid(f, model.vision.num_tokens, cfg.vision.grid_resampling)
            figures[key] = {
                "gflops_per_image": counter.get_total_flops() / batch / 1e9,
                "tokens": int(out.shape[1]),
                "channels": sum(int(f.shape[-1]) for f in outputs[key].values()),
                "features": [name for name, _ in wanted[key]],
                "image_size": int(model.all_towers()[key].image_size),
                "align_ms": 1000 * (time.perf_counter() - began) / batch,
            }
        seconds = timed_alternating({key: (lambda k=key: features_of(k)) for key in wanted}, repeats, sync)
    for key, s in seconds.items():
        figures[key]["ms_per_image"] = 1000 * s / batch
    return {
        "preset": "tiny" if tiny else "florence_vl_3b",
        "fusion": FUSION,
        "towers": figures,
        "fused_tokens": int(model.num_image_tokens),
        "fused_channels": int(model.fusion.output_dim),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def _features(path) -> str:
    from fvl.config import read_yaml

    return "[" + ",".join(read_yaml(path)["model"]["fusion"]["features"]) + "]"


def lines(r: dict) -> list[str]:
    out = [
        f"towers of {r['preset']} + {r['fusion']}, {r['device']} {r['dtype']}, batch {r['batch']} (median of "
        f"{r['repeats']}): {r['fused_tokens']} LLM tokens x {r['fused_channels']} channels per image"
    ]
    for key, t in r["towers"].items():
        out.append(
            f"  {key}: {t['image_size']} px, {t['tokens']} tokens -> {r['fused_tokens']}, {t['channels']} channels "
            f"({', '.join(t['features'])}): {t['ms_per_image']:.1f} ms/image, {t['gflops_per_image']:.1f} GFLOP/image "
            f"forward, grid alignment {t['align_ms']:.2f} ms/image"
        )
    return out
