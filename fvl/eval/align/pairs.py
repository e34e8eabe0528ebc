"""Caption pairs (synthetic, or a JSON-lines file of real ones) and their frozen vision and text features,
computed once for all variants and seeds."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fvl.config.eval import AlignConfig
from fvl.inputs.transform import ImageError, ImageTransform
from fvl.synthetic import generate

DATA_SEED = 0  # synthetic pairs: the same data for every run seed, so seeds differ only in split, init, order
FEATURE_BATCH = 64  # images per forward pass of the frozen tower and LLM


# ---- caption pairs and their frozen features ------------------------------------------------------------------


@dataclass
class PairFeatures:
    """Frozen features of the usable caption pairs: ``vision`` ``{name: [N, tokens, dim]}``, ``text`` unit
    vectors ``[N, D]``; ``skipped`` counts the pairs left out, per reason."""

    vision: dict[str, torch.Tensor]
    text: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)


def read_captions(path: str | Path) -> tuple[list[tuple[Path, str]], int]:
    """``(image path, caption)`` per line of a JSON-lines file of ``{"image": RELATIVE_PATH,
    "caption": TEXT}``, and the number of lines with an empty caption (left out). Image paths are relative to
    the file's folder; an absolute path or a ``..`` part is an error (naming the line), not a skip, since it
    points outside the data set the file describes."""
    path = Path(path)
    root = path.parent
    pairs, empty = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"]:
                raise ValueError(f'{where}: expected {{"image": RELATIVE_PATH, "caption": TEXT}}')
            rel = Path(item["image"])
            if rel.is_absolute() or ".." in rel.parts or "\x00" in item["image"]:
                raise ValueError(
                    f"{where}: image path {item['image']!r} must be relative to {root} (no absolute path, no '..')"
                )
            caption = item.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                empty += 1
                continue
            pairs.append((root / rel, caption.strip()))
    return pairs, empty


def _file_pairs(
    entries: Iterable[tuple[Path, str]], transform: ImageTransform, skipped: Counter[str]
) -> Iterator[tuple[torch.Tensor, str]]:
    """``(uint8 image, caption)`` of the entries whose image decodes; the others are counted in ``skipped``."""
    for path, caption in entries:
        try:
            data = path.read_bytes()
        except OSError:  # missing, a folder, unreadable
            skipped["missing_image"] += 1
            continue
        try:
            yield transform.decode(data, str(path)), caption
        except ImageError as e:
            skipped[e.reason] += 1


def _synthetic_pairs(n: int, transform: ImageTransform) -> Iterator[tuple[torch.Tensor, str]]:
    for i in range(n):
        sample = generate(i, "train", DATA_SEED)
        yield transform(sample.image), sample.caption


@torch.no_grad()
def _encode(model, batch: list[tuple[torch.Tensor, str]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Vision features and caption embeddings (unit vectors) of one batch of pairs, on the CPU."""
    device = next(model.parameters()).device
    px = torch.stack([p for p, _ in batch]).to(device)  # uint8: each tower makes its own input from it
    features = model.tower_features(px, model.feature_names)  # every tower's, on the main tower's grid
    vision = {name: feat.float().cpu() for name, feat in features.items()}
    enc = model.tokenizer([c for _, c in batch], add_special_tokens=False, padding=True, return_tensors="pt")
    hidden = model.llm(
        input_ids=enc.input_ids.to(device),
        attention_mask=enc.attention_mask.to(device),
        output_hidden_states=True,
    ).hidden_states[-1]
    mask = enc.attention_mask.to(device).unsqueeze(-1).float()
    text = nn.functional.normalize((hidden.float() * mask).sum(1) / mask.sum(1), dim=-1)
    return vision, text.cpu()


def encode_pairs(model, cfg: AlignConfig) -> PairFeatures:
    """The frozen features of up to ``cfg.samples`` caption pairs: synthetic ones, or the first usable pairs
    of ``cfg.captions``. Raises ValueError when fewer than 2 x batch_size pairs are usable."""
    model.eval()
    transform = model.processor.transform.with_mode("square")  # the decode every tower's input comes from
    skipped: Counter[str] = Counter()
    if cfg.captions:
        entries, empty = read_captions(cfg.captions)
        skipped["empty_caption"] += empty
        pairs = _file_pairs(entries, transform, skipped)
    else:
        pairs = _synthetic_pairs(cfg.samples, transform)
    vision: dict[str, list[torch.Tensor]] = {}
    text: list[torch.Tensor] = []
    stream = itertools.islice(pairs, cfg.samples)
    while batch := list(itertools.islice(stream, FEATURE_BATCH)):
        v, t = _encode(model, batch)
        for name, feat in v.items():
            vision.setdefault(name, []).append(feat)
        text.append(t)
    n = sum(len(t) for t in text)
    counts = {k: c for k, c in sorted(skipped.items()) if c}
    if n < 2 * cfg.batch_size:
        where = cfg.captions or "synthetic data"
        raise ValueError(
            f"align: {n} usable caption pairs in {where} (skipped: {counts or 'none'}); "
            f"need at least 2 x batch_size = {2 * cfg.batch_size} (one training and one held-out batch)"
        )
    return PairFeatures({k: torch.cat(v) for k, v in vision.items()}, torch.cat(text), counts)
