"""Padding-free packing: several samples share one row of up to ``max_length`` tokens, in transformers'
convention for packed batches: ``position_ids`` restart at 0 for each sample and ``attention_mask`` is
left out, so the model attends only within a sample: a block-diagonal mask built from the position ids under
SDPA or eager attention; flash-attention's variable-length path under ``flash_attention_2``, which transformers
takes for a batch of one row only, so there a micro batch is packed into one row (``datamodule.ONE_ROW``).

Samples are packed whole, so an image's placeholder tokens never straddle two rows, and the images keep
the order of their placeholders in the flattened batch. The first token of every sample is never a target
(its label is ignored), so the last token of one sample does not learn to predict the next sample: the
loss, the mean over supervised tokens of the batch, equals that of the same samples unpacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fvl.inputs.collate import Sample, stack_images
from fvl.text.templates import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of ``capacity`` tokens (a sample longer than
    ``capacity`` gets a row of its own). Rows keep their samples in the order given."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def collate_packed(samples: Sequence[Sample], capacity: int, pad_token_id: int) -> dict:
    """``input_ids``/``labels``/``position_ids`` of the packed rows, padded to the longest row (padding is its
    own short sequence whose labels are ignored), the images in placeholder order (``stack_images``), the ``ids`` in row
    order and ``samples_per_row``."""
    rows = pack_rows([len(s.input_ids) for s in samples], capacity)
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    images: list[torch.Tensor] = []
    order: list[str] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = samples[i]
            n = len(s.input_ids)
            ids[r, at : at + n] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(s.labels[1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            images += s.images
            order.append(s.id)
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a sequence of its own, never a target
    batch: dict = {"input_ids": ids, "labels": labels, "position_ids": positions, "ids": order}
    batch["samples_per_row"] = [len(row) for row in rows]
    batch.update(stack_images(images))
    return batch
