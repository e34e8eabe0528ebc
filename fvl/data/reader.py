"""Reading planned batches from shards: a catalog of every sample's place, a map-style dataset that turns a
list of sample ids into a model-ready batch, and the DataLoader that saves and restores its position.

Samples are read by random access (``fvl.data.tarindex``): one ``pread`` per sample, from any DataLoader
worker, with no shared file offset and no per-worker shard split, so what a rank reads is fixed by its
plan (``fvl.data.plan``) and the worker count changes nothing but speed. Put shards on a local or otherwise
seekable disk.

Every bad sample is skipped and counted by reason; a batch carries ``skipped`` (reason -> count) so the
trainer can sum them over ranks and log them - nothing is dropped silently. A batch whose every sample is
bad is refilled from the samples after it (deterministically, so a resume reads the same), and counted.
"""

from __future__ import annotations

import itertools
import json
import os
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fvl.data.feature_cache.store import FeatureCacheError, FeatureSpans
from fvl.data.packing import collate_packed
from fvl.data.plan import EpochBatches, Sources
from fvl.data.sources import SKIP_REASONS, Skip
from fvl.data.tarindex import SPAN, load_index, parse_sample
from fvl.inputs.collate import IGNORE_INDEX, Sample, collate
from fvl.inputs.processor import Processor
from fvl.inputs.transform import ImageError
from fvl.text.templates import TemplateError

# Every reason a stream can skip a sample for, in a fixed order (ranks sum their counts as one vector): the
# build's reasons (shards built by another fvl may hold what this one would have skipped), damage, and what
# only tokenisation finds.
STREAM_SKIP_REASONS = (
    "corrupt_shard",
    *SKIP_REASONS,
    "token_straddles",
    "too_long",
    "no_supervision",
    "bad_conversation",
    "refilled_batch",
)
MAX_REFILL_TRIES = 64


def sample_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw shard sample's ``json`` member (with ``conversations``), or ``Skip('bad_json')``."""
    try:
        meta = json.loads(raw["json"])
        meta["conversations"]  # noqa: B018 - required
        list(meta.get("image_keys", []))
    except (KeyError, ValueError, TypeError) as e:
        raise Skip("bad_json", f"{raw.get('__key__')}: {e}") from None
    return meta


def image_members(raw: dict[str, Any], meta: dict[str, Any]) -> list[bytes]:
    """The encoded images of a raw sample, in placeholder order, or ``Skip('missing_image')``."""
    keys = list(meta.get("image_keys", []))
    missing = [k for k in keys if k not in raw]
    if missing:
        raise Skip("missing_image", f"{raw.get('__key__')}: no {missing}")
    return [raw[k] for k in keys]


def decode_sample(
    raw: dict[str, Any], processor: Processor, features: list[torch.Tensor] | None = None
) -> Sample:
    """A raw shard sample (``json`` + image bytes) -> a model-ready ``Sample`` with uint8 images, or with the
    images' cached ``features`` when given (the image bytes are then not decoded); bad input raises
    ``Skip``. Each image is decoded once, at the size the tower needs."""
    meta = sample_meta(raw)
    conversations, keys = meta["conversations"], list(meta.get("image_keys", []))
    sample_id = str(meta.get("id") or raw.get("__key__", ""))
    try:
        if features is not None:
            if len(features) != len(keys):
                raise FeatureCacheError(
                    f"{sample_id}: {len(features)} cached feature sets for {len(keys)} images; rebuild the cache"
                )
            return processor.with_images(conversations, features, sample_id)
        return processor(conversations, image_members(raw, meta), sample_id)
    except ImageError as e:  # its message names the sample already
        raise Skip(e.reason, str(e)) from None
    except TemplateError as e:
        raise Skip(e.reason, f"{sample_id}: {e}") from None


@dataclass
class Catalog:
    """Where every sample of a set of shards lies: its shard, its byte span, and the length hints that
    length grouping sorts by. Sources occupy contiguous id ranges, in the order given.

    missing: samples the manifest lists but a damaged shard no longer holds, per source (counted as
    ``corrupt_shard``)."""

    paths: list[str]
    shard: np.ndarray
    start: np.ndarray
    end: np.ndarray
    text_len: np.ndarray
    images: np.ndarray
    sources: Sources
    missing: dict[str, int]

    @classmethod
    def build(cls, urls: dict[str, list[str]], expected: dict[str, int]) -> Catalog:
        """Index the shards of each source (sidecars, else a scan); ``expected`` is each shard's sample count
        from the manifest."""
        paths: list[str] = []
        parts: list[np.ndarray] = []
        shard_ids: list[np.ndarray] = []
        ranges: dict[str, tuple[int, int]] = {}
        missing: dict[str, int] = {}
        first = 0
        for name, source_urls in urls.items():
            count = 0
            for url in source_urls:
                spans = load_index(url) if os.path.exists(url) else np.zeros(0, dtype=SPAN)
                lost = max(0, expected.get(url, len(spans)) - len(spans))
                if lost:
                    missing[name] = missing.get(name, 0) + lost
                shard_ids.append(np.full(len(spans), len(paths), dtype=np.int32))
                paths.append(url)
                parts.append(spans)
                count += len(spans)
            ranges[name] = (first, count)
            first += count
        spans = np.concatenate(parts) if parts else np.zeros(0, dtype=SPAN)
        return cls(
            paths,
            np.concatenate(shard_ids) if shard_ids else np.zeros(0, dtype=np.int32),
            np.ascontiguousarray(spans["start"]),  # 26 bytes a sample: 10M samples hold 260 MB, shared
            np.ascontiguousarray(spans["end"]),  # copy-on-write with forked workers
            np.ascontiguousarray(spans["text_len"]),
            np.ascontiguousarray(spans["images"]),
            Sources(ranges),
            missing,
        )

    def __len__(self) -> int:
        return len(self.shard)

    def length_hints(self, image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(estimated tokens, has image) per sample: about four characters a token plus the image tokens."""
        return self.text_len.astype(np.int64) // 4 + self.images.astype(
            np.int64
        ) * image_tokens, self.images > 0


class ShardReader(Dataset):
    """``reader[ids]`` -> one collated batch of those samples (``ids``, ``labels``, uint8 ``pixel_values``
    ``[N, 3, S, S]`` - or, with ``features`` (a feature cache), ``image_features`` ``[N, tokens, dim]`` -,
    ``skipped`` reason -> count, ``num_tokens``, ``tokens_squared``, ``padding_fraction``). Picklable: open files are per process
    and reopened after a fork."""

    def __init__(
        self,
        catalog: Catalog,
        processor: Processor,
        pack: int = 0,
        max_open: int = 64,
        features: FeatureSpans | None = None,
    ) -> None:
        self.catalog = catalog
        self.processor = processor
        self.pack = pack  # > 0: pack samples into rows of this many tokens (fvl.data.packing)
        self.max_open = max_open
        self.features = features  # a feature cache: batches carry image_features instead of pixel_values
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": None}

    def __len__(self) -> int:
        return len(self.catalog)

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # a forked worker must not use its parent's descriptors' state
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return fd

    def raw(self, i: int) -> dict[str, Any]:
        """The members of sample ``i``; a damaged span raises ``Skip('corrupt_shard')``."""
        c = self.catalog
        start, end = int(c.start[i]), int(c.end[i])
        try:
            data = os.pread(self._fd(c.paths[int(c.shard[i])]), end - start, start)
            if len(data) != end - start:
                raise tarfile.ReadError(f"short read: {len(data)} of {end - start} bytes")
            return parse_sample(data)
        except (OSError, tarfile.TarError, ValueError, EOFError) as e:
            raise Skip("corrupt_shard", f"{c.paths[int(c.shard[i])]}@{start}: {e}") from None

    def sample(self, i: int) -> Sample:
        raw = self.raw(i)
        if self.features is None:
            return decode_sample(raw, self.processor)
        f = self.features
        fd = self._fd(f.paths[int(f.shard[i])])
        return decode_sample(raw, self.processor, f.read(i, fd, str(raw["__key__"])))

    def __getitem__(self, ids: Sequence[int]) -> dict[str, Any]:
        samples: list[Sample] = []
        skipped: Counter[str] = Counter()
        for i in ids:
            try:
                samples.append(self.sample(int(i)))
            except Skip as e:
                skipped[e.reason if e.reason in STREAM_SKIP_REASONS else "bad_conversation"] += 1
        if not samples:
            samples.append(self._refill(int(ids[0]) if len(ids) else 0, skipped))
        batch = batch_of(samples, self.processor.pad_token_id, skipped, self.pack)
        if self.features is not None:  # present even when text-only: the model then never runs the tower
            batch.setdefault("image_features", self.features.empty)
        # Counted here, on the CPU: the model then checks placeholders against images without a sync.
        batch["num_placeholders"] = int((batch["input_ids"] == self.processor.tokenizer.image_token_id).sum())
        return batch

    def _refill(self, after: int, skipped: Counter[str]) -> Sample:
        """A batch with no good sample would leave its rank without a step (and DDP waiting): take the next
        good sample after it in id order instead, counted as ``refilled_batch``."""
        n = len(self.catalog)
        for k in range(1, min(n, MAX_REFILL_TRIES) + 1):
            try:
                sample = self.sample((after + k) % n)
            except Skip as e:
                skipped[e.reason if e.reason in STREAM_SKIP_REASONS else "bad_conversation"] += 1
                continue
            skipped["refilled_batch"] += 1
            return sample
        raise RuntimeError(
            f"no readable sample among {MAX_REFILL_TRIES} after id {after} of {self.catalog.paths[0]} ...: "
            f"the shards look broken ({dict(skipped)}); rebuild them with fvl shards build"
        )


ONE_ROW = -1  # ``pack`` for one row per micro batch, however long


def batch_of(
    samples: list[Sample], pad_token_id: int, skipped: Counter[str] | dict[str, int], pack: int = 0
) -> dict[str, Any]:
    """Collate samples (packed into rows of ``pack`` tokens when > 0) and attach the plain-number counts the
    training step logs without a host sync."""
    if pack:  # ONE_ROW: the whole micro batch in one row (flash-attention's variable-length path)
        capacity = pack if pack > 0 else sum(len(s.input_ids) for s in samples)
        batch = collate_packed(samples, capacity, pad_token_id)
    else:
        batch = collate(samples, pad_token_id)
    batch["skipped"] = dict(skipped)
    tokens = sum(len(s.input_ids) for s in samples)
    batch["num_tokens"] = tokens
    batch["tokens_squared"] = sum(len(s.input_ids) ** 2 for s in samples)  # attention's FLOPs (models.flops)
    # the positions the loss supervises, as it shifts them (position t predicts label t+1)
    batch["num_supervised"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    batch["padding_fraction"] = 1.0 - tokens / max(1, batch["input_ids"].numel())
    return batch


def as_is(batch: Any) -> Any:
    """The collate function of loaders whose dataset already returns batches."""
    return batch


class PlannedLoader(DataLoader):
    """A DataLoader over a ``ShardReader`` driven by an ``EpochBatches`` plan, whose position Lightning saves
    in every checkpoint (``state_dict``) and restores on ``resume`` (``load_state_dict``): the resumed run
    reads the batches the interrupted one had not trained on, none twice. The training loop reports each
    batch it trains on with ``trained()`` (the DataModule does, as the batch enters its step)."""

    def __init__(
        self, reader: ShardReader, plan: EpochBatches, num_workers: int = 0, step_batches: int = 1, **kw
    ) -> None:
        super().__init__(
            reader,
            sampler=plan,
            batch_size=None,
            collate_fn=as_is,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            **kw,
        )
        self.plan = plan
        self.step_batches = step_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The plan's micro batches, each told ``step_supervised``: the supervised tokens of all the micro
        batches of its optimizer step on this rank (``step_batches`` of them from the epoch's start, as the
        trainer accumulates; the last step of an epoch may hold fewer). Reads ``step_batches`` ahead to count
        them; the position still advances only as a batch is trained (``trained``)."""
        batches = super().__iter__()
        while True:
            group = list(itertools.islice(batches, self.step_batches))
            if not group:
                return
            total = sum(b["num_supervised"] for b in group)
            for b in group:
                b["step_supervised"] = total
                yield b

    def trained(self) -> None:
        self.plan.advance()

    def state_dict(self) -> dict[str, Any]:
        epoch, batch = self.plan.position
        return {"epoch": epoch, "batch": batch, "plan": self.plan.settings.key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = state.get("plan") or {}, self.plan.settings.key()
        if saved != now:
            changed = sorted(k for k in now if saved.get(k) != now[k])
            raise ValueError(
                f"resume: the data plan changed since the checkpoint ({', '.join(changed)}: "
                f"{ {k: saved.get(k) for k in changed} } -> { {k: now[k] for k in changed} }); resuming would "
                "replay or skip samples. Restore those settings, or start a new run from the checkpoint's "
                "weights with init_from=CHECKPOINT instead of resume"
            )
        self.plan.position = (int(state["epoch"]), int(state["batch"]))
