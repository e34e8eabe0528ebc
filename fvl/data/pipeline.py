"""Streaming samples from shards: rank and worker splitting, shuffling, per-source mixing, tokenisation
through the model's template, preprocessing for its tower, skip counting and batching.

Every bad sample is skipped and counted by reason; each batch carries ``skipped`` (how many samples its
worker dropped since its previous batch) so the trainer can log the total - nothing is dropped silently.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image

from fvl.data.collate import Sample, collate
from fvl.data.image import preprocess_image
from fvl.data.sources import Skip, image_bytes
from fvl.text.templates import ChatTemplate, TemplateError


@dataclass
class SampleProcessor:
    """Raw shard sample -> model-ready ``Sample``; picklable so that DataLoader workers can use it."""

    tokenizer: Any
    template: ChatTemplate
    image_tokens: int
    image_size: int
    image_mean: Sequence[float]
    image_std: Sequence[float]
    resize_mode: str = "square"
    max_length: int | None = None

    @classmethod
    def for_model(cls, model, resize_mode: str) -> SampleProcessor:
        v = model.vision
        return cls(
            model.tokenizer,
            model.template,
            model.num_image_tokens,
            v.image_size,
            v.image_mean,
            v.image_std,
            resize_mode,
            model.cfg.text.max_length,
        )

    def __call__(self, raw: dict[str, Any]) -> Sample:
        try:
            meta = json.loads(raw["json"])
        except (KeyError, ValueError) as e:
            raise Skip("bad_json", str(e)) from None
        images = []
        for key in meta.get("image_keys", []):
            if key not in raw:
                raise Skip("missing_image", f"{raw.get('__key__')}: no {key}")
            image_bytes(raw[key], raw.get("__key__", ""))  # full decode check (truncation, bombs)
            images.append(Image.open(io.BytesIO(raw[key])))
        return self.from_conversation(
            meta["conversations"], images, str(raw.get("__key__", meta.get("id", "")))
        )

    def from_conversation(
        self, conversations: list[dict], images: list[Image.Image], sample_id: str = ""
    ) -> Sample:
        t = self.template.tokenize(
            conversations, self.tokenizer, self.image_tokens, self.max_length, num_images=len(images)
        )
        pixels = [
            preprocess_image(im, self.image_size, self.image_mean, self.image_std, self.resize_mode)
            for im in images
        ]
        return Sample(t.input_ids, t.labels, pixels, sample_id)


def split_by_rank(rank: int, world_size: int):
    """Pipeline stage: this rank's share of the shard list (every ``world_size``-th from ``rank``)."""

    def stage(src: Iterable) -> Iterator:
        yield from itertools.islice(src, rank, None, world_size)

    return stage


def process_and_batch(processor: SampleProcessor, batch_size: int, pad_token_id: int, drop_last: bool):
    """Pipeline stage: process samples (skipping bad ones, counted) and collate batches."""

    def stage(src: Iterable[dict]) -> Iterator[dict[str, Any]]:
        pending: list[Sample] = []
        skipped = 0
        for raw in src:
            try:
                pending.append(processor(raw))
            except (Skip, TemplateError):
                skipped += 1
                continue
            if len(pending) == batch_size:
                batch = collate(pending, pad_token_id)
                batch["skipped"] = torch.tensor(skipped)
                yield batch
                pending, skipped = [], 0
        if pending and not drop_last:
            batch = collate(pending, pad_token_id)
            batch["skipped"] = torch.tensor(skipped)
            yield batch

    return stage


def source_pipeline(
    urls: list[str], rank: int, world_size: int, resampled: bool, shuffle_buffer: int, seed: int
) -> wds.DataPipeline:
    """Raw samples of one source for this rank and DataLoader worker."""
    if resampled:
        # Each rank and worker draws shards independently (seeded), forever; the epoch length is set on
        # the batched stream, so every rank yields the same number of batches.
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed + 1000 * rank, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), split_by_rank(rank, world_size), wds.split_by_worker]
    stages.append(wds.tarfile_to_samples())
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100)))
    return wds.DataPipeline(*stages)


def make_dataset(
    urls_by_source: dict[str, list[str]],
    weights: dict[str, float],
    processor: SampleProcessor,
    batch_size: int,
    pad_token_id: int,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = False,
    epoch_samples: int = 0,
    num_workers: int = 1,
    shuffle_buffer: int = 0,
    seed: int = 0,
) -> wds.DataPipeline:
    """An ``IterableDataset`` of batches (use ``DataLoader(batch_size=None)``).

    Not resampled: every sample exactly once per epoch across ranks and workers (shards split by rank,
    then by worker); sources are mixed by weight until all are exhausted. Resampled: an endless draw,
    cut into epochs of ``ceil(epoch_samples / world_size / batch_size / workers)`` batches per worker."""
    names = list(urls_by_source)
    pipes = [
        source_pipeline(urls_by_source[n], rank, world_size, resampled, shuffle_buffer, seed) for n in names
    ]
    mixed: Any = (
        pipes[0]
        if len(pipes) == 1
        else wds.RandomMix(pipes, [weights[n] for n in names], longest=not resampled)
    )
    drop_last = resampled
    dataset = wds.DataPipeline(mixed, process_and_batch(processor, batch_size, pad_token_id, drop_last))
    if resampled:
        if epoch_samples <= 0:
            raise ValueError("a resampled dataset needs epoch_samples > 0")
        per_worker = math.ceil(epoch_samples / world_size / batch_size / max(1, num_workers))
        dataset = dataset.with_epoch(per_worker)
    return dataset
