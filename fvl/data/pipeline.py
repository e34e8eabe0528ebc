"""Streaming samples from shards: rank and worker splitting, shuffling, per-source mixing, tokenisation
and image preprocessing through a ``Processor`` (built from the model config, not the model), skip
counting and batching.

Every bad sample is skipped and counted by reason; each batch carries ``skipped`` (how many samples its
worker dropped since its previous batch) so the trainer can log the total - nothing is dropped silently.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from PIL import Image

from fvl.data.collate import Sample, collate
from fvl.data.config import DataConfig
from fvl.data.sources import Skip, image_bytes
from fvl.models.processor import Processor
from fvl.text.templates import TemplateError


def decode_sample(raw: dict[str, Any], processor: Processor) -> Sample:
    """A raw shard sample (``json`` + image bytes) -> a model-ready ``Sample``; bad input raises ``Skip``."""
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
    return processor(meta["conversations"], images, str(raw.get("__key__", meta.get("id", ""))))


@dataclass
class ShardSet:
    """The shards a stream reads: paths and mixing weight per source, sample count per shard."""

    urls: dict[str, list[str]]
    weights: dict[str, float]
    shard_samples: dict[str, int]

    @property
    def samples(self) -> dict[str, int]:
        return {s: sum(self.shard_samples.get(u, 0) for u in urls) for s, urls in self.urls.items()}

    @property
    def total(self) -> int:
        return sum(self.samples.values())


def split_by_rank(rank: int, world_size: int):
    """Pipeline stage: this rank's share of the shard list (every ``world_size``-th from ``rank``)."""

    def stage(src: Iterable) -> Iterator:
        yield from itertools.islice(src, rank, None, world_size)

    return stage


def process_and_batch(processor: Processor, batch_size: int, drop_last: bool, limit: int | None = None):
    """Pipeline stage: process samples (skipping bad ones, counted) and collate batches; ``limit`` stops
    after that many good samples."""

    def stage(src: Iterable[dict]) -> Iterator[dict[str, Any]]:
        pending: list[Sample] = []
        skipped = kept = 0
        for raw in src:
            if limit is not None and kept >= limit:
                break
            try:
                pending.append(decode_sample(raw, processor))
            except (Skip, TemplateError):
                skipped += 1
                continue
            kept += 1
            if len(pending) == batch_size:
                yield _batch(pending, processor.pad_token_id, skipped)
                pending, skipped = [], 0
        if pending and not drop_last:
            yield _batch(pending, processor.pad_token_id, skipped)

    return stage


def _batch(samples: list[Sample], pad_token_id: int, skipped: int) -> dict[str, Any]:
    batch = collate(samples, pad_token_id)
    batch["skipped"] = skipped  # plain ints, so that the training step needs no host sync to read them
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    return batch


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
    cfg: DataConfig, shards: ShardSet, processor: Processor, rank: int = 0, world_size: int = 1, seed: int = 0
) -> wds.DataPipeline:
    """An ``IterableDataset`` of training batches (use ``DataLoader(batch_size=None)``), read as ``cfg``
    says (``batch_size``, ``resampled``, ``epoch_samples``, ``num_workers``, ``shuffle_buffer``).

    Not resampled: every sample exactly once per epoch across ranks and workers (shards split by rank,
    then by worker); sources are mixed by weight until all are exhausted. Resampled: an endless draw,
    cut into epochs of ``ceil(epoch_samples / world_size / batch_size / workers)`` batches per worker."""
    names = list(shards.urls)
    pipes = [
        source_pipeline(shards.urls[n], rank, world_size, cfg.resampled, cfg.shuffle_buffer, seed)
        for n in names
    ]
    mixed: Any = (
        pipes[0]
        if len(pipes) == 1
        else wds.RandomMix(pipes, [shards.weights[n] for n in names], longest=not cfg.resampled)
    )
    dataset = wds.DataPipeline(mixed, process_and_batch(processor, cfg.batch_size, drop_last=cfg.resampled))
    if cfg.resampled:
        epoch_samples = cfg.epoch_samples or shards.total
        if epoch_samples <= 0:
            raise ValueError("a resampled dataset needs epoch_samples > 0")
        per_worker = math.ceil(epoch_samples / world_size / cfg.batch_size / max(1, cfg.num_workers))
        dataset = dataset.with_epoch(per_worker)
    return dataset


def heldout_dataset(
    urls: list[str], processor: Processor, batch_size: int, per_rank: int, rank: int = 0, world_size: int = 1
) -> wds.DataPipeline:
    """Validation batches from held-out shards, in file order: every ``world_size``-th sample from ``rank``,
    at most ``per_rank`` of them, so that every rank validates on as many samples (no DDP hang)."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        split_by_rank(rank, world_size),
        process_and_batch(processor, batch_size, drop_last=False, limit=per_rank),
    )
