"""Building WebDataset shards from a recipe: parallel, splittable across machines, atomic and resumable.

The work is cut into *tasks*: task ``k`` of a source holds its items ``[k*S, (k+1)*S)`` (S =
``samples_per_shard``). A task's samples go through WebDataset's ``ShardWriter`` into a private temporary
folder (a new tar whenever one passes ``max_shard_bytes``); when the task is complete its tars are renamed
into the output folder and a small ``.done.json`` record is written last. A rerun skips tasks that have
their record and redoes the others from scratch, so an interruption never leaves a truncated shard under a
final name. Tars are byte-reproducible (fixed mtime), so a rebuild gives the same sha256.

``--part K/N`` builds every N-th task starting at K (its own shard names, its own
``manifest-part-K-of-N.json``); ``merge`` combines the part manifests into ``manifest.json``, identical to
what one whole build writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from fvl.data.recipes import Recipe, SourceConfig
from fvl.data.sources import Skip, encode_item, read_items
from fvl.data.synthetic import GENERATOR_VERSION

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Task:
    source: str
    index: int  # task number within the source
    start: int
    end: int

    @property
    def stem(self) -> str:
        return f"{self.source}-{self.index:06d}"


def parse_part(part: str | None) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    if not part:
        return 0, 1
    try:
        k, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise ValueError(f"--part {part!r}: expected K/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"--part {part!r}: need 0 <= K < N")
    return k, n


def plan(recipe: Recipe, counts: dict[str, int]) -> list[Task]:
    """All tasks of the recipe, sources in recipe order."""
    size = recipe.shards.samples_per_shard
    tasks = []
    for s in recipe.sources:
        n = counts[s.name]
        tasks += [Task(s.name, k, k * size, min(n, (k + 1) * size)) for k in range((n + size - 1) // size)]
    return tasks


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_task(
    source: SourceConfig, task: Task, items: list[Any], out: Path, max_bytes: float, max_images: int = 0
) -> dict[str, Any]:
    """Encode one task's items into tars (see the module docstring); returns its record."""
    tmp = out / f".tmp-{task.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skipped: Counter[str] = Counter()
    per_file: Counter[str] = Counter()
    writer = wds.ShardWriter(
        str(tmp / f"{task.stem}-%03d.tar"), maxcount=1 << 62, maxsize=max_bytes, verbose=0, mtime=0.0
    )
    try:
        for offset, item in enumerate(items):
            try:
                sample = encode_item(source, item, task.start + offset, max_images)
            except Skip as e:
                skipped[e.reason] += 1
                continue
            writer.write(sample)
            per_file[Path(writer.fname).name] += 1
    finally:
        writer.close()
    shards = []
    for name in sorted(per_file):
        final = out / name
        os.replace(tmp / name, final)
        shards.append(
            {
                "path": name,
                "samples": per_file[name],
                "bytes": final.stat().st_size,
                "sha256": _sha256(final),
                "source": task.source,
            }
        )
    shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "task": task.stem,
        "source": task.source,
        "written": sum(per_file.values()),
        "skipped": dict(skipped),
        "shards": shards,
    }
    _write_json_atomic(out / f"{task.stem}.done.json", record)
    return record


def _run(args: tuple) -> dict[str, Any]:
    return run_task(*args)


def build(
    recipe: Recipe,
    out: str | Path,
    part: str | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build (or resume) the recipe's shards, or part ``K/N`` of them; returns the manifest written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k, n = parse_part(part)
    items = {s.name: read_items(s) for s in recipe.sources}
    tasks = [t for i, t in enumerate(plan(recipe, {name: len(v) for name, v in items.items()})) if i % n == k]
    pending = []
    for t in tasks:
        if not (out / f"{t.stem}.done.json").exists():
            for stale in out.glob(f"{t.stem}-*.tar"):  # renamed before an interruption, record missing
                stale.unlink()
            pending.append(t)
    sources = {s.name: s for s in recipe.sources}
    jobs = [
        (
            sources[t.source],
            t,
            items[t.source][t.start : t.end],
            out,
            recipe.shards.max_shard_bytes,
            recipe.shards.max_images,
        )
        for t in pending
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, _ in zip(jobs, pool.map(_run, jobs), strict=True):
                if progress:
                    progress(job[1].end - job[1].start)
    else:
        for job in jobs:
            _run(job)
            if progress:
                progress(job[1].end - job[1].start)
    records = [json.loads((out / f"{t.stem}.done.json").read_text()) for t in tasks]
    manifest = _manifest(records, recipe, part=f"{k}/{n}")
    _write_json_atomic(out / (MANIFEST if n == 1 else f"manifest-part-{k}-of-{n}.json"), manifest)
    return manifest


def _add_counts(sources: dict[str, dict[str, Any]], name: str, written: int, skipped: dict[str, int]) -> None:
    entry = sources[name]
    entry["written"] += written
    for reason, count in skipped.items():
        entry["skipped"][reason] = entry["skipped"].get(reason, 0) + count


def _manifest(records: list[dict[str, Any]], recipe: Recipe, part: str) -> dict[str, Any]:
    sources = {
        s.name: {"written": 0, "skipped": {}, "weight": s.weight, "format": s.format} for s in recipe.sources
    }
    for s in recipe.sources:
        if s.format == "synthetic":  # so that shards of an older generator are recognised and rebuilt
            sources[s.name]["generator_version"] = GENERATOR_VERSION
    for r in records:
        _add_counts(sources, r["source"], r["written"], r["skipped"])
    shards = sorted((sh for r in records for sh in r["shards"]), key=lambda sh: sh["path"])
    return {
        "recipe": recipe.path,
        "part": part,
        "max_images": recipe.shards.max_images,
        "sources": sources,
        "shards": shards,
    }


def merge(out: str | Path) -> dict[str, Any]:
    """Combine ``manifest-part-K-of-N.json`` files (all K of one N must be present) into ``manifest.json``."""
    out = Path(out)
    loaded = [json.loads(p.read_text()) for p in sorted(out.glob("manifest-part-*-of-*.json"))]
    if not loaded:
        raise FileNotFoundError(f"{out}: no part manifests (manifest-part-K-of-N.json) to merge")
    ns = {m["part"].split("/")[1] for m in loaded}
    if len(ns) != 1:
        raise ValueError(f"{out}: part manifests of different splits {sorted(ns)}")
    n = int(ns.pop())
    have = sorted(int(m["part"].split("/")[0]) for m in loaded)
    if have != list(range(n)):
        raise ValueError(f"{out}: parts {have} present, need all of 0..{n - 1}")
    sources = {name: {**s, "written": 0, "skipped": {}} for name, s in loaded[0]["sources"].items()}
    for m in loaded:
        for name, s in m["sources"].items():
            _add_counts(sources, name, s["written"], s["skipped"])
    shards = sorted((sh for m in loaded for sh in m["shards"]), key=lambda sh: sh["path"])
    manifest = {"recipe": loaded[0]["recipe"], "part": "0/1", "sources": sources, "shards": shards}
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{folder}: no {MANIFEST}; build shards first (fvl shards build RECIPE --out {folder})"
        )
    return json.loads(path.read_text())
