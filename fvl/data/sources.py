"""Reading recipe sources into WebDataset samples, with every bad input skipped and named by reason.

``read_items(source)`` streams a source's raw items (annotation entries, or indices for ``synthetic``) in
file order without holding the file in memory: a LLaVA JSON array is parsed item by item with ``ijson``,
JSON lines (``caption_jsonl``, or ``llava_json`` whose file name ends in ``.jsonl``) line by line.
``encode_item(source, item, index)`` turns one into a sample dict for ``ShardWriter`` or raises ``Skip``.
A sample holds the image bytes and ``json``: the conversations in the LLaVA schema, the source name, the id
and ``image_keys`` in placeholder order; several images become ``img0.<ext>``, ``img1.<ext>`` ... Images
keep their format: RGB JPEG/PNG files pass through byte for byte, other JPEGs (CMYK, grayscale) become RGB
JPEGs (quality ``JPEG_QUALITY``), everything else a lossless RGB PNG.

Image paths are checked as written in the annotation (no absolute path, no ``..``), not after resolving
symlinks: LLaVA's usual layout links dataset folders into the image root (``images/coco -> /datasets/coco``).
"""

from __future__ import annotations

import io
import itertools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import ijson
from PIL import Image

from fvl.data.recipes import SourceConfig
from fvl.inputs.transform import to_rgb
from fvl.synthetic import generate
from fvl.text.templates import TemplateError, normalize_conversation

IMAGE_TOKEN = "<image>"
NOTES_KEY = "_normalised"  # a sample's entry for what ``llava_rules`` changed (popped before writing)
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default bomb threshold, made an error instead of a warning
# Non-RGB JPEGs are re-encoded as JPEG: a lossless PNG of a photo is 3-10x larger, and at 95 the loss is far
# below what the tower's resize to 384/768 px keeps.
JPEG_QUALITY = 95

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


def read_items(source: SourceConfig) -> Iterator[Any]:
    """The source's items in their file order, ``max_samples`` applied, streamed: the annotation file is
    opened once, when iteration starts, and never held in memory whole."""
    if source.format == "synthetic":
        items: Iterator[Any] = iter(range(source.num_samples))
    elif source.format == "llava_json":
        items = _json_lines(source.annotations) if is_json_lines(source) else _json_array(source.annotations)
    elif source.format == "caption_jsonl":
        items = _json_lines(source.annotations)
    else:
        raise ValueError(f"unknown source format {source.format!r}")
    return items if source.max_samples is None else itertools.islice(items, source.max_samples)


def is_json_lines(source: SourceConfig) -> bool:
    """Whether the source's items are JSON lines (parsed per item by ``encode_item``)."""
    return source.format == "caption_jsonl" or str(source.annotations).endswith(".jsonl")


def _json_lines(path: str | None) -> Iterator[bytes]:
    with open(str(path), "rb") as f:
        for line in f:
            if line.strip():
                yield line  # decoded and parsed per item: one bad line (not JSON, not UTF-8) is one counted skip


def _json_array(path: str | None) -> Iterator[Any]:
    """The elements of the top-level JSON array in ``path``, one at a time (numbers as plain floats)."""
    with open(str(path), "rb") as f:
        if _first_char(f) != b"[":
            raise ValueError(f"{path}: a LLaVA JSON file must hold a list of samples")
        f.seek(0)
        try:
            yield from ijson.items(f, "item", use_float=True)
        except ijson.JSONError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None


def _first_char(f: Any) -> bytes:
    """The first byte of a binary file that is not JSON whitespace (b"" when there is none)."""
    while block := f.read(1 << 16):
        stripped = block.lstrip(b" \t\r\n")
        if stripped:
            return stripped[:1]
    return b""


def safe_image_path(image_root: str | None, relative: Any) -> Path:
    """The image file under ``image_root``. The path *as written in the annotation* must stay under the root:
    not absolute, and its ``..`` parts (resolved as text, before any link is followed) never climbing above
    the root (``sub/../sub/a.jpg`` stays inside; ``sub/../../a.jpg`` does not). Symlinks inside the root are
    followed wherever they point, since the dataset folders are usually linked in
    (``images/coco -> /datasets/coco``) by whoever set up the root."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise Skip("bad_image_path", repr(relative))
    rel = PurePosixPath(relative.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(relative).drive:
        raise Skip("bad_image_path", relative)
    parts: list[str] = []
    for part in rel.parts:
        if part == "..":
            if not parts:
                raise Skip("bad_image_path", relative)
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts:
        raise Skip("bad_image_path", relative)
    return Path(image_root or ".").joinpath(*parts)


def load_image_bytes(path: Path) -> tuple[bytes, str]:
    """``(bytes, extension)`` of an image that decodes completely; RGB JPEG/PNG pass through unchanged."""
    if not path.is_file():
        raise Skip("missing_image", str(path))
    data = path.read_bytes()
    if not data:
        raise Skip("empty_image", str(path))
    return image_bytes(data, str(path))


def image_bytes(data: bytes, where: str = "") -> tuple[bytes, str]:
    """``(bytes, extension)`` of an image that decodes completely, in the format it is stored as (see the
    module docstring), or ``Skip``."""
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
    # A camera's MPO is a JPEG with extra frames after the first, which is all a JPEG decoder reads.
    jpeg = image.format in ("JPEG", "MPO")
    if image.mode == "RGB" and (jpeg or image.format == "PNG"):
        return data, "jpg" if jpeg else "png"
    out = io.BytesIO()
    if jpeg:  # CMYK or grayscale: a photo, where PNG would be 3-10x larger
        to_rgb(image).save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), "jpg"
    to_rgb(image).save(out, format="PNG")
    return out.getvalue(), "png"


def llava_rules(conversations: list[Any]) -> tuple[list[Any], list[str]]:
    """LLaVA's preprocessing of a conversation (``preprocess_multimodal`` and ``preprocess`` in its train.py),
    which the authors trained with: a leading turn that is not the human's is dropped, and in a turn with one
    ``<image>`` the placeholder is removed and put in front (``<image>\n`` + the rest, stripped). A turn with
    several placeholders (multi-image samples) stays as written. Returns the turns and what was changed
    (``dropped_leading_turn``, ``image_moved_to_front``) for the manifest's counts."""
    notes: list[str] = []
    if not isinstance(conversations, list) or not conversations:
        return conversations, notes
    if isinstance(conversations[0], dict) and conversations[0].get("from", conversations[0].get("role")) in (
        "gpt",
        "assistant",
    ):
        conversations = conversations[1:]
        notes.append("dropped_leading_turn")
    out = []
    for turn in conversations:
        text = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(text, str) and text.count(IMAGE_TOKEN) == 1:
            moved = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
            if moved != text:
                turn = {**turn, "value": moved}
                notes.append("image_moved_to_front")
        out.append(turn)
    return out, notes


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


def _parse_line(line: str | bytes) -> dict[str, Any]:
    try:
        item = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except UnicodeDecodeError as e:
        raise Skip("bad_json", f"not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise Skip("bad_json", str(e)) from None
    if not isinstance(item, dict):
        raise Skip("bad_json", "a line must hold an object")
    return item


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

    if is_json_lines(source):
        item = _parse_line(item)
    if source.format == "caption_jsonl":
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
    conversations, notes = item.get("conversations"), []
    if source.format == "llava_json" and source.conversation_rules == "llava":
        conversations, notes = llava_rules(conversations)
    conversations = check_conversation(conversations, len(relatives))
    images = [load_image_bytes(safe_image_path(source.image_root, rel)) for rel in relatives]
    meta = {"id": str(item.get("id", index)), "source": source.name, "conversations": conversations}
    sample = _sample(key, images, meta)
    if notes:
        sample[NOTES_KEY] = sorted(set(notes))  # counted by the build, never written
    return sample
