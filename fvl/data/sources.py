"""Reading recipe sources into WebDataset samples, with every bad input skipped and named by reason.

``read_items(source)`` lists a source's raw items (annotation entries, or indices for ``synthetic``);
``encode_item(source, item, index)`` turns one into a sample dict for ``ShardWriter`` or raises ``Skip``.
A sample holds the image bytes (``jpg`` when the file already is an RGB JPEG, else a lossless ``png`` after
conversion to RGB; several images become ``img0.<ext>``, ``img1.<ext>`` ...) and ``json``: the
conversations in the LLaVA schema, the source name, the id and ``image_keys`` in placeholder order.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from fvl.data.recipes import SourceConfig
from fvl.data.synthetic import generate
from fvl.models.vision.transform import to_rgb
from fvl.text.templates import TemplateError, normalize_conversation

IMAGE_TOKEN = "<image>"
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default bomb threshold, made an error instead of a warning

SKIP_REASONS = (
    "bad_json",
    "bad_image_path",
    "missing_image",
    "empty_image",
    "unreadable_image",
    "decompression_bomb",
    "no_conversations",
    "empty_turn",
    "bad_roles",
    "placeholder_mismatch",
)


class Skip(Exception):
    """A bad input item; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def read_items(source: SourceConfig) -> list[Any]:
    """The source's items in their file order, ``max_samples`` applied."""
    if source.format == "synthetic":
        items: list[Any] = list(range(source.num_samples))
    elif source.format == "llava_json":
        with open(source.annotations, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{source.annotations}: a LLaVA JSON file must hold a list of samples")
        items = data
    elif source.format == "caption_jsonl":
        items = []
        with open(source.annotations, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    items.append(line)  # parsed per item, so that one bad line is one counted skip
    else:
        raise ValueError(f"unknown source format {source.format!r}")
    return items[: source.max_samples] if source.max_samples is not None else items


def safe_image_path(image_root: str | None, relative: Any) -> Path:
    """The image file under ``image_root``; absolute paths and paths escaping the root are rejected."""
    if not isinstance(relative, str) or not relative.strip():
        raise Skip("bad_image_path", repr(relative))
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise Skip("bad_image_path", relative)
    root = Path(image_root or ".").resolve()
    path = (root / rel).resolve()
    if root not in path.parents:
        raise Skip("bad_image_path", relative)
    return path


def load_image_bytes(path: Path) -> tuple[bytes, str]:
    """``(bytes, extension)`` of an image that decodes completely; RGB JPEG/PNG pass through unchanged."""
    if not path.is_file():
        raise Skip("missing_image", str(path))
    data = path.read_bytes()
    if not data:
        raise Skip("empty_image", str(path))
    return image_bytes(data, str(path))


def image_bytes(data: bytes, where: str = "") -> tuple[bytes, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Skip("decompression_bomb", f"{where} {image.width}x{image.height}")
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Skip("decompression_bomb", f"{where} {e}") from None
        except Skip:
            raise
        except Exception as e:  # truncated, corrupt, unknown format
            raise Skip("unreadable_image", f"{where} {type(e).__name__}: {e}") from None
    if image.width == 0 or image.height == 0:
        raise Skip("empty_image", where)
    if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
        return data, "jpg" if image.format == "JPEG" else "png"
    out = io.BytesIO()
    to_rgb(image).save(out, format="PNG")
    return out.getvalue(), "png"


def check_conversation(conversations: Any, n_images: int) -> list[dict[str, str]]:
    """Validate LLaVA turns for ``n_images`` images; return them as plain dicts or raise ``Skip``."""
    if not isinstance(conversations, list) or not conversations:
        raise Skip("no_conversations")
    if not all(isinstance(t, dict) for t in conversations):
        raise Skip("no_conversations", "turns must be objects")
    try:
        turns = normalize_conversation(conversations)
    except TemplateError as e:
        raise Skip(e.reason, str(e)) from None
    if turns[-1][0] != "assistant":
        raise Skip("bad_roles", "the last turn is not an assistant answer")
    placeholders = sum(text.count(IMAGE_TOKEN) for role, text in turns if role == "user")
    if any(IMAGE_TOKEN in text for role, text in turns if role != "user"):
        raise Skip("placeholder_mismatch", "image placeholder outside a user turn")
    if placeholders != n_images:
        raise Skip("placeholder_mismatch", f"{placeholders} placeholders for {n_images} image(s)")
    return [
        {"from": t.get("from", t.get("role")), "value": t.get("value", t.get("content"))}
        for t in conversations
    ]


def _sample(key: str, images: list[tuple[bytes, str]], meta: dict[str, Any]) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key}
    if len(images) == 1:
        data, ext = images[0]
        sample[ext] = data
        meta["image_keys"] = [ext]
    else:
        meta["image_keys"] = []
        for i, (data, ext) in enumerate(images):
            sample[f"img{i}.{ext}"] = data
            meta["image_keys"].append(f"img{i}.{ext}")
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def encode_item(source: SourceConfig, item: Any, index: int, max_images: int = 0) -> dict[str, Any]:
    """One raw item -> a WebDataset sample dict (or ``Skip``). ``max_images`` > 0: a sample with more images
    can never fit the model and is skipped as ``too_many_images``."""
    key = f"{source.name}-{index:09d}"
    if source.format == "synthetic":
        s = generate(
            int(item),
            source.split,
            source.seed,
            source.image_size,
            tuple(source.kinds) if source.kinds else None,
        )
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        meta = {
            "id": s.id, "source": source.name, "conversations": s.conversations(source.task),
            "kind": s.kind, "skill": s.skill, "question": s.question, "answer": s.answer, "caption": s.caption,
        }  # fmt: skip
        return _sample(key, [(buf.getvalue(), "png")], meta)

    if source.format == "caption_jsonl":
        try:
            item = json.loads(item)
        except json.JSONDecodeError as e:
            raise Skip("bad_json", str(e)) from None
        if not isinstance(item, dict):
            raise Skip("bad_json", "a line must hold an object")
        caption = item.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise Skip("empty_turn", "empty caption")
        item = {
            "id": item.get("id", index), "image": item.get("image"),
            "conversations": [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}],
        }  # fmt: skip
        if item["image"] is None:
            raise Skip("bad_image_path", "caption line without an image")
    elif not isinstance(item, dict):
        raise Skip("bad_json", "a sample must be an object")

    image_field = item.get("image")
    relatives = [] if image_field is None else image_field if isinstance(image_field, list) else [image_field]
    if max_images and len(relatives) > max_images:
        raise Skip("too_many_images", f"{len(relatives)} images; the model fits {max_images} per sample")
    conversations = check_conversation(item.get("conversations"), len(relatives))
    images = [load_image_bytes(safe_image_path(source.image_root, rel)) for rel in relatives]
    meta = {"id": str(item.get("id", index)), "source": source.name, "conversations": conversations}
    return _sample(key, images, meta)
