"""Florence-2 feature extraction per image, fvl's way against the reference way, side by side in one run:
``bench_features()``.

- ``fvl``: ``Florence2Tower.features(pixels, names)`` for the paper's four features (``davit`` and the
  encoder outputs under the three prompts): DaViT runs once per image and the three prompts go through the
  encoder as one batch; no decoder.
- ``reference``: what the original Florence-VL code does per image batch: for each prompt, transformers'
  ``Florence2ForConditionalGeneration.generate(max_new_tokens=1)`` (DaViT + projection + the encoder over
  image and prompt tokens + one decoder step), keeping the encoder's last hidden state.

Both run the same random-init weights at a published size (``FLORENCE2_ARCHS``: no download), on random
pixels, under ``torch.inference_mode()``: float32 on a CPU, bfloat16 on a GPU (synchronised before the clock
is read). The two take turns within each repeat, so machine noise falls on both alike; the figures are
medians over the repeats, after a warm-up (which, with ``compile=True``, includes compiling fvl's tower).
``max_abs_diff`` compares the prompt features of the two ways in the warm-up: the reference is only a
yardstick if it computes the same thing.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Florence2ForConditionalGeneration

from fvl.assets.florence2_arch import FLORENCE2_ARCHS, random_init_config
from fvl.config.model import VisionConfig, plain_dict
from fvl.models.vision.florence2 import Florence2Tower


def bench_archs() -> dict[str, dict]:
    """The sizes ``bench_features`` takes by name: Florence-2 ``base`` and ``large``, and the ``tiny`` preset's
    arch (a seconds-long smoke test of the same code)."""
    from fvl.config import load

    return {**FLORENCE2_ARCHS, "tiny": plain_dict(load("tiny").model.vision.arch)}


def build_pair(arch: dict, image_size: int, device: str, dtype: torch.dtype):
    """fvl's tower and transformers' full Florence-2 (decoder and LM head included) with the same weights."""
    cfg = VisionConfig(name="florence2", init="random", arch=copy.deepcopy(arch), image_size=image_size)
    tower = Florence2Tower(cfg)  # the paper's three prompts, the built-in tokenizer
    reference = Florence2ForConditionalGeneration(random_init_config(copy.deepcopy(arch), tower.tokenizer))
    tower.davit.load_state_dict(reference.model.vision_tower.state_dict())
    tower.image_projection.load_state_dict(reference.model.multi_modal_projector.state_dict())
    tower.encoder.load_state_dict(reference.model.language_model.encoder.state_dict())
    return tower.to(device, dtype).eval(), reference.to(device, dtype).eval()


def reference_features(
    reference, prompt_ids: list[torch.Tensor], pixels: torch.Tensor, n_image: int
) -> list[torch.Tensor]:
    """The original way: one ``generate(max_new_tokens=1)`` per prompt, each recomputing DaViT; the image
    tokens' slice of the encoder's last hidden state under each prompt."""
    out = []
    for ids in prompt_ids:
        placeholders = torch.full((n_image,), reference.config.image_token_id, device=ids.device)
        input_ids = torch.cat([placeholders, ids]).expand(pixels.shape[0], -1)
        generated = reference.generate(
            input_ids=input_ids,
            pixel_values=pixels,
            max_new_tokens=1,
            do_sample=False,
            num_beams=1,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        out.append(generated.encoder_hidden_states[-1][:, :n_image])
    return out


def prompt_token_ids(tower: Florence2Tower) -> list[torch.Tensor]:
    """Each prompt as Florence-2's processor tokenises it (``<s> text </s>``), unpadded."""
    return [ids[mask.bool()] for ids, mask in zip(tower.prompt_ids, tower.prompt_mask, strict=True)]


def timed_alternating(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict:
    """Median seconds per call of each function, the functions taking turns within each repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            began = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_features(
    arch: str = "base",
    batch: int = 4,
    image_size: int = 768,
    repeats: int = 5,
    device: str = "cpu",
    compile: bool = False,
) -> dict:
    """Milliseconds per image of fvl's feature extraction and of the reference way, at Florence-2 ``arch``
    (``base``, ``large``, or ``tiny``), random pixels ``batch x 3 x image_size^2``; ``compile=True``
    compiles fvl's tower (``model.vision.compile``), the reference stays eager."""
    archs = bench_archs()
    if arch not in archs:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(archs)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    tower, reference = build_pair(archs[arch], image_size, device, dtype)
    if compile:
        tower.compile()
    names = tower.feature_names  # davit + the three prompts: what florence_vl_3b fuses
    prompts = prompt_token_ids(tower)
    n_image = tower.num_tokens + 1  # transformers' image tokens: the pooled one first
    start = 0 if tower.keep_pooled_token else 1
    pixels = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fvl_way():
        return tower.features(pixels, names)

    def reference_way():
        return reference_features(reference, prompts, pixels, n_image)

    with torch.inference_mode():
        ours, theirs = fvl_way(), reference_way()  # warm-up (and compilation), excluded from the timing
        diff = max(
            (ours[name].float() - ref[:, start:].float()).abs().max().item()
            for name, ref in zip(tower.prompt_names, theirs, strict=True)
        )
        seconds = timed_alternating({"fvl": fvl_way, "reference": reference_way}, repeats, sync)
    return {
        "fvl_ms": 1000 * seconds["fvl"] / batch,
        "reference_ms": 1000 * seconds["reference"] / batch,
        "speedup": seconds["reference"] / seconds["fvl"],
        "arch": arch,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile,
        "batch": batch,
        "image_size": image_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "max_abs_diff": diff,
    }


def summary(result: dict) -> str:
    """One line for a terminal or BENCHMARKS.md."""
    r = result
    return (
        f"Florence-2-{r['arch']} features, {r['batch']} x {r['image_size']} px, {r['device']} {r['dtype']}"
        f"{', compiled' if r['compile'] else ''}: fvl {r['fvl_ms']:.1f} ms/image, reference "
        f"{r['reference_ms']:.1f} ms/image, {r['speedup']:.2f}x (median of {r['repeats']}; "
        f"max |diff| {r['max_abs_diff']:.1e})"
    )


HEADLINE = ("feature_extraction_speedup", "speedup")


def lines(r: dict) -> list[str]:
    return [summary(r)]
