"""Building a feature cache (``fvl features build``): run a checkpoint's frozen tower and fusion once over every
image of a set of shards and write the fused features beside them (format: ``fvl.data.feature_cache.store``).

Each feature shard is written to a temporary name and renamed when complete, then indexed, then recorded
(``<shard>.done.json``); a build that was stopped resumes at the first shard without a record, and redoes
nothing that is recorded with the same identity. The manifest is written last.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fvl.config.stage import trains_vision
from fvl.data.feature_cache.store import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    EntryWriter,
    FeatureCacheError,
    encode_entry,
    identity_of,
)
from fvl.data.reader import Catalog, ShardReader, image_members, sample_meta
from fvl.data.shards import load_manifest
from fvl.data.shardset import shard_set
from fvl.data.sources import Skip
from fvl.data.tarindex import write_index
from fvl.util.locks import building
from fvl.util.threads import beside_workers, torch_threads

log = logging.getLogger(__name__)


@dataclass
class _Item:
    index: int
    key: str
    images: list[torch.Tensor]
    skip: str = ""


class _Images(Dataset):
    """Sample ``i`` -> its key and uint8 images (decoded as training would), or the reason it is skipped."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> _Item:
        try:
            raw = self.reader.raw(i)
        except Skip as e:  # a damaged span: the training reader skips it the same way
            return _Item(i, f"__damaged_{i}", [], e.reason)
        key = str(raw["__key__"])
        try:  # the training reader's checks, so the cache skips what training would skip
            encoded = image_members(raw, sample_meta(raw))
        except Skip as e:
            return _Item(i, key, [], e.reason)
        try:
            return _Item(i, key, [self.reader.processor.image(data, key) for data in encoded])
        except Exception as e:  # noqa: BLE001 - an ImageError carries its reason; anything else is unreadable
            return _Item(i, key, [], getattr(e, "reason", "unreadable_image"))


@dataclass
class _Batch:
    items: list[_Item]  # their images moved into ``pixels``
    pixels: torch.Tensor | None  # every image of the batch, in order: one tensor crosses from the worker


def _collate(items: list[_Item]) -> _Batch:
    images = [im for item in items for im in item.images]
    counts = [len(item.images) for item in items]
    for item, n in zip(items, counts, strict=True):
        item.images = [None] * n  # type: ignore[list-item]  # the count stays, the tensors travel stacked
    return _Batch(items, torch.stack(images) if images else None)


def build_features(
    checkpoint: str | Path,
    shards: str | Path,
    out: str | Path,
    sources: Sequence[str] = (),
    resize_mode: str = "pad",
    dtype: str = "bfloat16",
    batch_size: int = 32,
    num_workers: int = 1,
    device: str = "auto",
    runs: str = "runs",
    progress: Callable[[int], None] | None = None,
    model: Any = None,
    all_features: bool = False,
) -> dict[str, Any]:
    """Write the feature cache of ``checkpoint`` (a weights file, run folder or ``latest``; or an already
    loaded ``model``) for the shards of ``sources`` (all when empty) in ``shards``; returns its manifest.

    resize_mode: the image transform of the stage that will read the cache (``pad`` for finetune).
    dtype: how the features are stored (bfloat16, float16 or float32).
    progress: called with the number of samples done after each batch.
    all_features: store every feature of the tower side by side (``side_by_side``) instead of the model's
    fused ones."""
    from fvl.models import load_for_inference

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    began = time.perf_counter()
    if model is None:
        model = load_for_inference(checkpoint, runs)
    if all_features:
        side_by_side(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    identity = {**identity_of(model, resize_mode), "dtype": dtype}
    shards, out = Path(shards), Path(out)
    manifest = load_manifest(shards)
    chosen = shard_set(shards, manifest, list(sources) or None)
    names = {Path(u).name for urls in chosen.urls.values() for u in urls}
    entries = [sh for sh in manifest["shards"] if sh["path"] in names]
    _refuse_other_cache(out, identity)
    out.mkdir(parents=True, exist_ok=True)

    todo = [sh for sh in entries if not _recorded(out, sh, identity)]
    skipped: Counter[str] = Counter()
    if todo:
        urls = {"todo": [str(shards / sh["path"]) for sh in todo]}
        catalog = Catalog.build(urls, {str(shards / sh["path"]): int(sh.get("samples", 0)) for sh in todo})
        reader = ShardReader(catalog, model.processor.with_resize_mode(resize_mode))
        loader = DataLoader(
            _Images(reader), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
        )
        threads = beside_workers(num_workers) if device == "cpu" and num_workers else 0
        with torch_threads(threads):  # the workers decode while the tower runs: a core each
            _write(model, loader, catalog, todo, out, identity, DTYPES[dtype], skipped, progress, device)
    for sh in entries:  # what earlier (resumed) builds skipped counts too
        if sh not in todo:
            skipped.update(json.loads(_record_path(out, sh["path"]).read_text()).get("skipped", {}))

    listed = {sh["path"] for sh in entries}
    entries += [  # shards an earlier build wrote here with the same identity (other sources) stay listed
        sh for sh in _listed(out) if sh["path"] not in listed and _recorded(out, sh, identity)
    ]
    result = {
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "checkpoint": str(checkpoint),
        "shards_folder": str(shards.resolve()),
        "shards": [
            {"path": sh["path"], "sha256": sh.get("sha256"), "samples": int(sh.get("samples", 0))}
            for sh in entries
        ],
        "skipped": dict(skipped),
        "seconds": time.perf_counter() - began,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return result


def _write(model, loader, catalog, todo, out, identity, dtype, skipped, progress, device) -> None:
    """Run the tower over the loader's batches and write each shard's entries in sample order."""
    writer: EntryWriter | None = None
    current = -1
    counts: Counter[str] = Counter()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def finish(shard: int) -> None:
        nonlocal writer
        writer.close()
        name = todo[shard]["path"]
        os.replace(out / f".{name}.tmp", out / name)
        write_index(out / name)
        record = {"identity": identity, "sha256": todo[shard].get("sha256"), "skipped": dict(counts)}
        _record_path(out, name).write_text(json.dumps(record) + "\n")
        skipped.update(counts)
        counts.clear()
        writer = None

    with torch.no_grad():
        for batch in loader:
            fused = None
            if batch.pixels is not None:
                with autocast:
                    fused = model.fuse_images(batch.pixels.to(device)).to(dtype).cpu()
            at = 0
            for item in batch.items:
                shard = int(catalog.shard[item.index])
                while current < shard:  # entries arrive in order: a new shard starts
                    if writer is not None:
                        finish(current)
                    current += 1
                    writer = EntryWriter(out / f".{todo[current]['path']}.tmp")
                if item.skip:
                    counts[item.skip] += 1
                    writer.add(item.key, encode_entry(None, item.skip))
                    continue
                n = len(item.images)
                mine = fused[at : at + n] if n else torch.empty(0, *_shape(model), dtype=dtype)
                at += n
                writer.add(item.key, encode_entry(mine))
            if progress:
                progress(len(batch.items))
    while current < len(todo) - 1:  # shards at the end with no sample left (all lost to damage)
        if writer is not None:
            finish(current)
        current += 1
        writer = EntryWriter(out / f".{todo[current]['path']}.tmp")
    if writer is not None:
        finish(current)


def _shape(model) -> tuple[int, int]:
    return model.num_image_tokens, model.fusion.output_dim


def _listed(out: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((out / MANIFEST).read_text()).get("shards", []))
    except (OSError, ValueError):
        return []


def _record_path(out: Path, name: str) -> Path:
    return out / f"{name}.done.json"


def _recorded(out: Path, entry: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether this shard's features are already written, with this identity, for this very shard."""
    record = _record_path(out, entry["path"])
    if not (record.is_file() and (out / entry["path"]).is_file()):
        return False
    try:
        done = json.loads(record.read_text())
    except ValueError:
        return False
    return done.get("identity") == identity and done.get("sha256") == entry.get("sha256")


def _refuse_other_cache(out: Path, identity: dict[str, Any]) -> None:
    """Never overwrite a cache built by another model (it may be in use): ask for another folder."""
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        built = json.loads(path.read_text()).get("identity", {})
    except ValueError:
        return
    differ = sorted(k for k in identity if built.get(k) != identity[k])
    if differ:
        raise FeatureCacheError(
            f"{out} holds a feature cache of another model or setting ({', '.join(differ)} differ); "
            "write this one to another folder, or delete that one first"
        )


def side_by_side(model: Any) -> Any:
    """``model`` with its fusion replaced by a channel concat of every feature its tower makes (in place):
    a cache built from it serves any parameter-free fusion over a subset of those features
    (``fvl.data.feature_cache.FeatureSelection``), so one cache serves a whole fusion sweep."""
    import dataclasses

    from fvl.config.model import FusionConfig
    from fvl.models.fusion import build_fusion

    names = list(model.feature_names)  # every tower's
    fusion_cfg = FusionConfig("dbfusion", names)
    dims = {n: model.feature_dim(n) for n in names}
    model.fusion = build_fusion(fusion_cfg, dims, model.vision.num_tokens)
    model.cfg = dataclasses.replace(model.cfg, fusion=fusion_cfg)
    return model


def cache_for_stage(
    cfg: Any, checkpoint: str | Path | None, folder: str | Path, shared: bool = False
) -> Path | None:
    """The feature cache a stage of ``cfg`` (an experiment config) can read when it starts from
    ``checkpoint`` (None: a first stage, whose model is built from ``cfg``): built under
    ``folder/<identity>`` (or reused, when a complete cache of the same tower and transform is there already)
    and returned; None when the cache does not apply or would not pay.

    It applies when the stage trains neither the tower nor a fusion with parameters, and, for a first stage,
    when the tower's weights come from ``model.vision.path`` (a random-init tower differs with the seed). It
    pays when the stage reads at least one pass over its samples (the build runs the tower once per sample; a
    shorter stage runs it less often than that). Measured break-even: about 1.1 passes for the tiny preset on
    a 2-core CPU, under one pass for the 3B model on a GPU (BENCHMARKS.md).

    shared: the cache holds every feature of the tower side by side (``side_by_side``), so that every run
    of a fusion sweep with this tower reads the same one; it is then built whatever one run reads. Builds
    of one folder are serialised by a file lock: runs side by side wait for the first build, then reuse it."""
    import hashlib

    import lightning as L

    from fvl.data.datamodule import ensure_shards
    from fvl.models import build_model, load_for_inference, set_trainable

    exp = cfg
    if trains_vision(exp.stage.trainable) or exp.data.feature_cache:
        return None
    towers = exp.model.vision.in_use(list(exp.model.fusion.features)).values()
    if checkpoint is None and any(t.init != "pretrained" for t in towers):
        return None
    manifest = ensure_shards(exp.data, progress=False)
    samples = shard_set(exp.data.shards, manifest, list(exp.data.sources) or None).total
    reads = exp.trainer.max_steps * exp.train.global_batch_size
    if reads < samples and not shared:
        log.info(
            "no feature cache for stage %s: it reads %d samples, fewer than the %d a cache holds",
            exp.stage.name, reads, samples,
        )  # fmt: skip
        return None
    if checkpoint is None:
        L.seed_everything(exp.seed, workers=True)
        model = build_model(exp.model).eval()
    else:
        model = load_for_inference(checkpoint, exp.output_dir)
    set_trainable(model, exp.stage.trainable)
    if not model.features_frozen():
        return None
    if shared:
        if any(True for _ in model.fusion.parameters()):
            return None  # a learned fusion cannot be computed from the features as they are read
        side_by_side(model)
    identity = {**identity_of(model, exp.stage.resize_mode), "dtype": "bfloat16"}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(folder) / key
    out.parent.mkdir(parents=True, exist_ok=True)
    with building(out):
        if not _complete(out, identity, exp.data.shards, exp.data.sources):
            build_features(
                checkpoint or "(built from the config)", exp.data.shards, out, exp.data.sources,
                exp.stage.resize_mode, batch_size=max(32, exp.data.batch_size),
                num_workers=exp.data.num_workers, model=model,
            )  # fmt: skip
    return out


def _complete(out: Path, identity: dict[str, Any], shards: str | Path, sources: Sequence[str]) -> bool:
    """Whether ``out`` holds a finished cache of ``identity`` covering the current shards of ``sources``."""
    try:
        built = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if built.get("identity") != identity:
        return False
    manifest = load_manifest(Path(shards))
    chosen = shard_set(Path(shards), manifest, list(sources) or None)
    names = {Path(u).name for urls in chosen.urls.values() for u in urls}
    cached = {sh["path"]: sh.get("sha256") for sh in built.get("shards", [])}
    return all(cached.get(sh["path"]) == sh.get("sha256") for sh in manifest["shards"] if sh["path"] in names)
