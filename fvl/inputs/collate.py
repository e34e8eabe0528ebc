"""Batching tokenised samples: pad to the longest in the batch, stack every image in placeholder order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fvl.text.templates import IGNORE_INDEX


@dataclass
class Sample:
    """One model-ready sample: ids/labels from a template and its images, each ``uint8 [3, S, S]`` or, read
    from a feature cache, its fused features ``[tokens, dim]`` (maybe none)."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    id: str = ""


def collate(
    samples: Sequence[Sample], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` padded to the longest sample (labels padded with -100),
    the images (``stack_images``: absent when the batch is text-only) and the samples' ``ids``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[row, cols] = torch.tensor(s.labels, dtype=torch.long)
        mask[row, cols] = 1
    batch: dict = {"input_ids": ids, "attention_mask": mask, "labels": labels, "ids": [s.id for s in samples]}
    batch.update(stack_images([im for s in samples for im in s.images]))
    return batch


def stack_images(images: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entry of a batch's images, in placeholder order: ``pixel_values`` ``[N, 3, S, S]``, or
    ``image_features`` ``[N, tokens, dim]`` when they are cached fused features; nothing for none."""
    if not images:
        return {}
    return {"image_features" if images[0].dim() == 2 else "pixel_values": torch.stack(list(images))}
