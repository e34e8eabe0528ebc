"""Helpers the tests import: tiny configs of every tower and LLM architecture, and small data recipes with
deliberately broken samples, written by the tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fvl.config import load
from fvl.util.resources import shipped_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = shipped_dir("experiments")


def stage_trainable(name: str) -> list[str]:
    """The trainable components a shipped stage declares (``experiments/stages/NAME.yaml``)."""
    return list(load("tiny", [f"stage={name}"]).stage.trainable)


TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "patch_size": 8,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


def tiny_cfg(*overrides, **replace):
    """The tiny preset's model config with dot-list overrides (``fusion.name=avg_pool``); keyword
    arguments replace whole entries (``llm_arch=TINY_LLAMA`` sets ``model.llm.arch``), since a dict given
    as an override merges into the preset's instead of replacing it. ``build_model`` validates the result."""
    cfg = load("tiny", [f"model.{o}" for o in overrides]).model
    for key, value in replace.items():
        section, name = key.split("_", 1)
        setattr(getattr(cfg, section), name, value)
    return cfg


def tower_cfg(tower: str, *overrides: str):
    """The tiny preset with its tower swapped for a tiny CLIP or SigLIP (32 px, 16 tokens, layers -2 and -1)."""
    if tower == "florence2":
        return tiny_cfg(*overrides)
    return tiny_cfg(
        f"vision.name={tower}",
        "vision.image_size=32",
        "vision.layers=[-2,-1]",
        "fusion.features=[layer_-2,layer_-1]",
        *overrides,
        vision_arch=dict(TINY_VIT),
    )


GOOD_LLAVA = [
    "rgb_jpg",
    "text_only",
    "gray_png",
    "rgba_png",
    "palette_png",
    "cmyk_jpg",
    "i16_png",
    "two_images",
]
BAD_LLAVA = {
    "missing_image": 1,
    "unreadable_image": 1,  # truncated JPEG
    "empty_image": 1,  # zero-byte file
    "decompression_bomb": 1,
    "bad_image_path": 2,  # ../ and absolute
    "placeholder_mismatch": 3,  # image without <image>, two <image> for one image, <image> in an answer
    "no_conversations": 2,  # missing, empty list
    "empty_turn": 1,
    "bad_roles": 2,  # not alternating, ending with the user
}
GOOD_CAPTIONS = 3
BAD_CAPTIONS = {"bad_json": 1, "empty_turn": 1, "missing_image": 1}


def _conv(q="<image>\nWhat is it?", a="A thing."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_sources(root: Path) -> Path:
    """Images, a LLaVA JSON and a caption JSONL with good and broken samples; returns the recipe path."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    rgb.save(images / "rgb.jpg", quality=90)
    rgb.convert("L").save(images / "gray.png")
    rgb.convert("RGBA").save(images / "rgba.png")
    rgb.convert("P").save(images / "palette.png")
    rgb.convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(images / "i16.png")
    data = (images / "rgb.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "empty.jpg").write_bytes(b"")
    Image.new("1", (12000, 9000)).save(images / "bomb.png")  # 108M pixels, tiny file
    samples = [
        {"id": "rgb_jpg", "image": "rgb.jpg", "conversations": _conv()},
        {"id": "text_only", "conversations": _conv("Tell me a joke.", "No.")},
        {"id": "gray_png", "image": "gray.png", "conversations": _conv()},
        {"id": "rgba_png", "image": "rgba.png", "conversations": _conv()},
        {"id": "palette_png", "image": "palette.png", "conversations": _conv()},
        {"id": "cmyk_jpg", "image": "cmyk.jpg", "conversations": _conv()},
        {"id": "i16_png", "image": "i16.png", "conversations": _conv()},
        {
            "id": "two_images",
            "image": ["rgb.jpg", "gray.png"],
            "conversations": _conv("<image>\n<image>\nSame?", "No."),
        },
        {"id": "b1", "image": "nope.jpg", "conversations": _conv()},
        {"id": "b2", "image": "truncated.jpg", "conversations": _conv()},
        {"id": "b3", "image": "empty.jpg", "conversations": _conv()},
        {"id": "b4", "image": "bomb.png", "conversations": _conv()},
        {"id": "b5", "image": "../secret.jpg", "conversations": _conv()},
        {"id": "b6", "image": "/etc/passwd", "conversations": _conv()},
        {"id": "b7", "image": "rgb.jpg", "conversations": _conv("What is it?")},
        {"id": "b8", "image": "rgb.jpg", "conversations": _conv("<image>\n<image>\nWhat?")},
        {
            "id": "b9",
            "image": "rgb.jpg",
            "conversations": _conv(a="See <image>")[:1] + [{"from": "gpt", "value": "x <image>"}],
        },
        {"id": "b10", "image": "rgb.jpg"},
        {"id": "b11", "image": "rgb.jpg", "conversations": []},
        {"id": "b12", "image": "rgb.jpg", "conversations": _conv(a="")},
        {"id": "b13", "image": "rgb.jpg", "conversations": _conv() + _conv("again?")[1:]},
        {"id": "b14", "image": "rgb.jpg", "conversations": _conv() + [{"from": "human", "value": "and?"}]},
    ]
    (root / "llava.json").write_text(json.dumps(samples))
    lines = [
        json.dumps({"id": f"c{i}", "image": "rgb.jpg", "caption": f"caption {i}"})
        for i in range(GOOD_CAPTIONS)
    ]
    lines += ['{"id": "c_bad", "image": ', json.dumps({"id": "c_empty", "image": "rgb.jpg", "caption": " "}),
              json.dumps({"id": "c_missing", "image": "gone.jpg", "caption": "x"})]  # fmt: skip
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "sources:\n"
        "  - {name: llava, format: llava_json, annotations: llava.json, image_root: images, weight: 2}\n"
        "  - {name: captions, format: caption_jsonl, annotations: captions.jsonl, image_root: images}\n"
        "  - {name: synth, format: synthetic, num_samples: 30, task: qa}\n"
        "shards: {samples_per_shard: 4}\n"
    )
    return recipe


def synthetic_recipe(path: Path, captions: int, qa: int, per_shard: int) -> Path:
    """A two-source synthetic recipe (captions for pretrain, questions for finetune) at ``path``."""
    path.write_text(
        "sources:\n"
        f"  - {{name: synthetic_caption, format: synthetic, num_samples: {captions}, task: caption}}\n"
        f"  - {{name: synthetic_qa, format: synthetic, num_samples: {qa}, task: qa}}\n"
        f"shards: {{samples_per_shard: {per_shard}}}\n"
    )
    return path


REAL_PRECISION = [
    "trainer.precision=bf16-mixed",
    "model.vision.frozen_dtype=bfloat16",
    "model.llm.frozen_dtype=bfloat16",
]


def run_setting(root: Path, captions: int, qa: int, per_shard: int) -> tuple[str, list[str]]:
    """A small synthetic recipe under ``root`` and what every test run on it shares: its recipe and shards,
    a private MLflow store, no validation, no loader workers, no progress bar. Returns ``(tracking uri,
    overrides)``."""
    synthetic_recipe(root / "recipe.yaml", captions=captions, qa=qa, per_shard=per_shard)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = [f"data.recipe={root / 'recipe.yaml'}", f"data.shards={root / 'shards'}", f"tracking.uri={uri}",
                 "data.val_samples=0", "data.num_workers=0", "trainer.progress=false"]  # fmt: skip
    return uri, overrides


def cache_setting(root: Path, captions: int, qa: int, per_shard: int):
    """What the feature-cache tests start from: a small synthetic recipe with its shards built under ``root``,
    the config overrides that read it, and a seeded tiny finetune model saved as ``root/init.safetensors``.
    Returns ``(overrides, model, checkpoint)``."""
    import torch

    from fvl.data.datamodule import build_datamodule
    from fvl.models import build_model, save_checkpoint

    synthetic_recipe(root / "recipe.yaml", captions=captions, qa=qa, per_shard=per_shard)
    base = [f"data.recipe={root / 'recipe.yaml'}", f"data.shards={root / 'shards'}", "data.num_workers=0",
            "data.batch_size=8", "data.val_samples=0"]  # fmt: skip
    torch.manual_seed(0)
    model = build_model(load("finetune", base).model)
    checkpoint = save_checkpoint(model, root / "init.safetensors")
    build_datamodule(load("finetune", base)).setup()  # builds the shards
    return base, model, checkpoint


def free_port() -> int:
    """A TCP port free on the loopback now, for a rendezvous (tests side by side never share one)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
