"""A generated fuzz set: ``n_bad`` broken samples of many kinds mixed with ``n_good`` good ones, as LLaVA JSON
lines (one sample a line, so a broken line is one sample) over an image folder written here.

Each bad sample breaks one thing, drawn in turn from ``BAD_KINDS`` with random parameters (a fixed seed):
images truncated, with a corrupt header, empty, 0x0, a 20000x20000 bomb, missing, behind ``..`` or an
absolute path; lines that are not JSON, not UTF-8, not objects; conversations missing, of the wrong type,
empty, with a missing or non-string value, with an empty answer, with ``<image>`` count mismatches, not
alternating; and conversations so long that truncation would cut away every answer. Good samples include
the odd-but-valid images (1x1, CMYK, 16-bit, palette with transparency, animated GIF, a PNG named .jpg).
``expected_good`` maps each good sample's id to its conversation, so a test can check that every one arrives
exactly; ``bad_kinds`` says which kind each bad sample is.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BAD_KINDS = (
    "truncated_image", "corrupt_header", "empty_image_file", "zero_size_image", "bomb_image", "missing_image",
    "dotdot_path", "absolute_path", "not_json", "not_utf8", "not_an_object", "no_conversations",
    "conversations_not_a_list", "turn_not_an_object", "value_not_a_string", "missing_value", "empty_answer",
    "placeholder_missing", "placeholder_twice", "placeholder_in_answer", "ends_with_user", "wrong_role",
    "answer_cut_by_truncation",
)  # fmt: skip
ODD_GOOD = (
    "rgb_jpg",
    "png_named_jpg",
    "one_pixel",
    "cmyk_jpg",
    "i16_png",
    "palette_transparent",
    "animated_gif",
)


@dataclass
class FuzzSet:
    recipe: Path
    expected_good: dict[str, list[dict]] = field(default_factory=dict)
    bad_kinds: dict[str, str] = field(default_factory=dict)
    exact_images: dict[str, list[bytes]] = field(default_factory=dict)  # RGB JPEG/PNG: kept byte for byte


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _odd_image(kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """Bytes and file extension of a valid but unusual image."""
    photo = _photo(rng, int(rng.integers(8, 90)), int(rng.integers(8, 90)))
    if kind == "rgb_jpg":
        return _jpeg(photo), "jpg"
    if kind == "png_named_jpg":
        return _png(photo), "jpg"
    if kind == "one_pixel":
        return _png(photo.resize((1, 1))), "png"
    if kind == "cmyk_jpg":
        return _jpeg(photo.convert("CMYK")), "jpg"
    if kind == "i16_png":
        return _png(Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16))), "png"
    if kind == "palette_transparent":
        pal = photo.convert("P")
        pal.info["transparency"] = 0
        return _png(pal, transparency=0), "png"
    if kind == "animated_gif":
        frames = [_photo(rng, 24, 24).convert("P") for _ in range(3)]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
        return buf.getvalue(), "gif"
    raise ValueError(kind)


def _conv(q: str = "<image>\nWhat is shown?", a: str = "Something.") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_fuzz_set(root: Path, n_bad: int = 1000, n_good: int = 100, seed: int = 0) -> FuzzSet:
    """Write images, ``fuzz.jsonl`` and ``recipe.yaml`` under ``root`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    order = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    good_jpg = _jpeg(_photo(rng, 40, 30))
    (images / "good.jpg").write_bytes(good_jpg)
    bomb = images / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400M pixels in a few KB
    # a PNG whose header says 0 x 0: PIL cannot write one, so patch the IHDR of a real one
    zero = bytearray(_png(Image.new("RGB", (1, 1))))
    zero[16:24] = b"\x00" * 8
    (images / "zero.png").write_bytes(bytes(zero))
    (images / "empty.jpg").write_bytes(b"")
    fuzz = FuzzSet(root / "recipe.yaml")
    lines: list[bytes] = []

    def add(sample: dict | None, raw: bytes | None = None) -> None:
        lines.append(raw if raw is not None else json.dumps(sample, ensure_ascii=False).encode())

    for i in range(n_good):
        kind = ODD_GOOD[i % len(ODD_GOOD)]
        data, ext = _odd_image(kind, rng)
        name = f"good{i}.{ext}"
        (images / name).write_bytes(data)
        conv = _conv(
            f"<image>\nGood sample {i}: what is it? " + "word " * int(rng.integers(0, 30)), f"Answer {i}."
        )
        if i % 10 == 9:  # some text-only samples, and some with two images
            conv, name = _conv(f"Text only {i}?", f"Yes {i}."), None
        elif i % 10 == 8:
            conv, name = _conv(f"<image>\n<image>\nTwo images {i}?", f"Two {i}."), [name, "good.jpg"]
        sample = {"id": f"good-{i}", "conversations": conv, **({"image": name} if name else {})}
        fuzz.expected_good[f"good-{i}"] = conv
        if kind in ("rgb_jpg", "png_named_jpg") and name:
            names = name if isinstance(name, list) else [name]
            fuzz.exact_images[f"good-{i}"] = [(images / n).read_bytes() for n in names]
        add(sample)

    for i in range(n_bad):
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        sid = f"bad-{i}-{kind}"
        fuzz.bad_kinds[sid] = kind
        sample: dict = {"id": sid, "image": "good.jpg", "conversations": _conv()}
        if kind == "truncated_image":
            cut = int(rng.integers(1, len(good_jpg) - 2))
            (images / f"{sid}.jpg").write_bytes(good_jpg[:cut])
            sample["image"] = f"{sid}.jpg"
        elif kind == "corrupt_header":
            data = bytearray(good_jpg)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, 12))] = int(rng.integers(0, 256))
            data[0] = 0x00  # never a JPEG or PNG signature
            (images / f"{sid}.jpg").write_bytes(bytes(data))
            sample["image"] = f"{sid}.jpg"
        elif kind == "empty_image_file":
            sample["image"] = "empty.jpg"
        elif kind == "zero_size_image":
            sample["image"] = "zero.png"
        elif kind == "bomb_image":
            sample["image"] = "bomb.png"
        elif kind == "missing_image":
            sample["image"] = f"nowhere/{sid}.jpg"
        elif kind == "dotdot_path":
            sample["image"] = order.choice(["../good.jpg", "a/../../good.jpg", "images/../../x.jpg"])
        elif kind == "absolute_path":
            sample["image"] = order.choice(["/etc/passwd", str(images / "good.jpg")])
        elif kind == "not_json":
            add(None, order.choice([b'{"id": "x", "conversations": [', b"not json at all", b'{"a": 1,,}']))
            continue
        elif kind == "not_utf8":
            add(None, b'{"id": "' + sid.encode() + b'", "conversations": "\xff\xfe bad bytes"}')
            continue
        elif kind == "not_an_object":
            add(None, order.choice([b"[1, 2, 3]", b'"a string"', b"42", b"null"]))
            continue
        elif kind == "no_conversations":
            sample.pop("conversations")
        elif kind == "conversations_not_a_list":
            sample["conversations"] = order.choice(["hello", 7, {"from": "human"}, None])
        elif kind == "turn_not_an_object":
            sample["conversations"] = ["<image>\nhi", "there"]
        elif kind == "value_not_a_string":
            sample["conversations"] = [{"from": "human", "value": 12}, {"from": "gpt", "value": ["a"]}]
        elif kind == "missing_value":
            sample["conversations"] = [{"from": "human"}, {"from": "gpt", "value": "x"}]
        elif kind == "empty_answer":
            sample["conversations"] = _conv(a=order.choice(["", "   ", "\n"]))
        elif kind == "placeholder_missing":
            sample["conversations"] = _conv(q="What is shown?")
        elif kind == "placeholder_twice":
            sample["conversations"] = _conv(q="<image>\n<image>\nWhat?")
        elif kind == "placeholder_in_answer":
            sample["conversations"] = _conv(a="It is <image>")
        elif kind == "ends_with_user":
            sample["conversations"] = [*_conv(), {"from": "human", "value": "And?"}]
        elif kind == "wrong_role":
            sample["conversations"] = [
                {"from": "robot", "value": "<image>\nhi"},
                {"from": "gpt", "value": "x"},
            ]
        elif kind == "answer_cut_by_truncation":  # a question longer than any model's max_length
            sample["conversations"] = _conv(q="<image>\n" + "very long question " * 3000)
        add(sample)

    order.shuffle(lines)
    (root / "fuzz.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    fuzz.recipe.write_text(
        "sources:\n  - {name: fuzz, format: llava_json, annotations: fuzz.jsonl, image_root: images,"
        " conversation_rules: as_written}\n"
        "shards: {samples_per_shard: 64}\n"
    )
    return fuzz
