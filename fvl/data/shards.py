"""Building WebDataset shards from a recipe: streamed, parallel, split across machines, atomic, resumable.

Layout of the output folder, for task ``k`` of source ``NAME`` (its *stem* is ``NAME-kkkkkk``)::

    NAME-kkkkkk-000.tar            the task's samples; -001.tar ... whenever one passes max_shard_bytes
    NAME-kkkkkk-000.tar.idx.npy    the tar's sample index (fvl.data.tarindex), beside it
    NAME-kkkkkk.done.json          the task's record: counts, shard entries, the fingerprint it was built with
    manifest.json                  (manifest-part-K-of-N.json for a part) every record of the build, summed

Tasks: each annotation file is read once per build, streamed (``read_items``); its items are cut into tasks of
``samples_per_shard`` as they come, so that task ``k`` holds items ``[k*S, (k+1)*S)``, and each task to build
goes to the process pool as soon as it is complete (at most ``2 x workers`` in flight, so a source is never
held in memory whole). A task's samples go through WebDataset's ``ShardWriter`` into a private temporary
folder; when the task is complete, each tar's index sidecar and then the tar are renamed into the output
folder, and the ``.done.json`` record is written last. An interruption therefore never leaves a truncated
shard under a final name, nor a tar without its index. Tars are byte-reproducible (fixed mtime), so a rebuild
gives the same sha256.

Resume: a record is trusted only when its fingerprint matches the build's (``fingerprint``: the annotation
file's size, mtime and first MiB, the source's parameters except ``weight``, the shard settings, the
synthetic generator version and ``SHARD_FORMAT_VERSION``) and its files are on disk at their recorded sizes.
Before building, every stale record of the recipe's sources is removed with its tars and sidecars (one
warning per source says why); a task without a trusted record is rebuilt from scratch after removing what is
left of it, and once a source has been read through, the files of tasks beyond its new task count are
removed. Items of trusted tasks are read past without being kept.

``--part K/N`` builds every N-th task starting at K (task numbers count across the recipe's sources in
order, as in a whole build) and writes ``manifest-part-K-of-N.json``; ``merge`` combines the part manifests
into ``manifest.json``, identical to what one whole build writes. A part removes stale records of any part
(they can never become valid) but the record-less files of another part's tasks only when they lie beyond
the new task count: inside it they may be that part's work in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from fvl.data.recipes import Recipe, ShardSettings, SourceConfig
from fvl.data.sources import NOTES_KEY, Skip, encode_item, read_items
from fvl.data.tarindex import write_index
from fvl.synthetic import GENERATOR_VERSION
from fvl.util.files import write_text_atomic

MANIFEST = "manifest.json"
# Bump whenever what a task writes changes (sample layout, image encoding, sidecars), so that shards of an
# older fvl are rebuilt instead of mixed in. 2: index sidecars, non-RGB JPEGs kept as JPEG.
SHARD_FORMAT_VERSION = 2
HEAD_BYTES = 1 << 20  # the part of an annotation file hashed into the fingerprint (with its size and mtime)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    source: str
    index: int  # task number within the source
    start: int
    end: int

    @property
    def stem(self) -> str:
        return task_stem(self.source, self.index)


def task_stem(source: str, index: int) -> str:
    return f"{source}-{index:06d}"


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


# ---- fingerprints ------------------------------------------------------------------------------------------
def annotation_identity(path: str | Path) -> dict[str, Any]:
    """What tells an annotation file's versions apart without reading it whole: size, mtime and a hash of
    its first MiB (an edit that keeps size and mtime is caught when it is near the top)."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def fingerprint(source: SourceConfig, settings: ShardSettings) -> dict[str, Any]:
    """Everything a source's shards depend on; a record built with another fingerprint is stale. ``weight``
    is left out: it is read at training time and changes no shard."""
    params = {k: v for k, v in dataclasses.asdict(source).items() if k != "weight"}
    fp: dict[str, Any] = {
        "format_version": SHARD_FORMAT_VERSION,
        "source": params,
        "annotations": None if source.format == "synthetic" else annotation_identity(str(source.annotations)),
        "samples_per_shard": settings.samples_per_shard,
        "max_shard_bytes": settings.max_shard_bytes,
        "max_images": settings.max_images,
    }
    if source.format == "synthetic":
        fp["generator_version"] = GENERATOR_VERSION
        fp["max_images"] = 0  # one image per sample: no limit changes what is written
    return json.loads(json.dumps(fp))  # as a record stores it, so that comparing with a loaded one is exact


_LABELS = {
    "format_version": "shard format changed (older fvl)",
    "annotations": "annotation file changed",
    "generator_version": "synthetic generator changed",
}


def stale_reasons(old: Any, new: dict[str, Any]) -> list[str]:
    """Why a record built with fingerprint ``old`` cannot be trusted under ``new`` (empty: it can)."""
    if not isinstance(old, dict):
        return ["no fingerprint (built by an older fvl)"]
    reasons = []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        if key == "source" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            params = old[key].keys() | new[key].keys()
            reasons += [f"{p} changed" for p in sorted(params) if old[key].get(p) != new[key].get(p)]
        else:
            reasons.append(_LABELS.get(key, f"{key} changed"))
    return reasons


def recipe_drift(manifest: dict[str, Any], recipe: Recipe) -> list[str]:
    """How the recipe as it reads now differs from what the shards were built from (the fingerprints their
    manifest records), one line per difference: a source added or removed, an annotation file or image
    folder changed, a setting changed. Empty: the shards are the recipe's."""
    built = manifest.get("sources", {})
    settings = dataclasses.replace(recipe.shards, max_images=int(manifest.get("max_images") or 0))
    lines = []
    for source in recipe.sources:
        if source.name not in built:
            lines.append(f"source {source.name!r} is in the recipe but not in the shards")
            continue
        try:
            now = fingerprint(source, settings)
        except OSError as e:
            lines.append(f"source {source.name!r}: {e}")
            continue
        old = built[source.name].get("fingerprint")
        if isinstance(old, dict) and source.format != "synthetic":
            now["max_images"] = old.get("max_images", now["max_images"])  # the image limit is checked apart
        lines += [f"source {source.name!r}: {why}" for why in stale_reasons(old, now)]
    lines += [f"source {name!r} is in the shards but no longer in the recipe" for name in built if
              name not in {s.name for s in recipe.sources}]  # fmt: skip
    return lines


# ---- files of a source in the output folder ----------------------------------------------------------------
def _file_pattern(source: str) -> re.Pattern[str]:
    # Anchored on the exact name: source "a" must not claim the files of a source "a-b".
    return re.compile(rf"{re.escape(source)}-(\d{{6}})(?:-\d{{3}}\.tar|-\d{{3}}\.tar\.idx\.npy|\.done\.json)")


def source_files(out: Path, source: str) -> dict[int, list[Path]]:
    """The tars, index sidecars and records of ``source`` in ``out``, by task number."""
    pattern = _file_pattern(source)
    files: dict[int, list[Path]] = {}
    for entry in os.scandir(out):
        match = pattern.fullmatch(entry.name)
        if match:
            files.setdefault(int(match.group(1)), []).append(out / entry.name)
    return files


def _record_path(out: Path, stem: str) -> Path:
    return out / f"{stem}.done.json"


def _remove(paths: Iterable[Path]) -> None:
    # The record goes first: a record on disk always means complete, valid tars.
    for path in sorted(paths, key=lambda p: not p.name.endswith(".done.json")):
        path.unlink(missing_ok=True)


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _files_intact(out: Path, record: dict[str, Any]) -> bool:
    try:
        return all(
            (out / sh["path"]).stat().st_size == sh["bytes"] and (out / sh["index"]).is_file()
            for sh in record["shards"]
        )
    except (OSError, KeyError, TypeError):
        return False


def record_reasons(out: Path, record: dict[str, Any] | None, fp: dict[str, Any]) -> list[str]:
    """Why a task's record cannot be trusted (empty: it can)."""
    if record is None:
        return ["unreadable record"]
    reasons = stale_reasons(record.get("fingerprint"), fp)
    if not reasons and not _files_intact(out, record):
        reasons = ["shard files missing or resized"]
    return reasons


def remove_stale(out: Path, source: str, fp: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Remove every record of ``source`` that ``fp`` does not trust, with its tars and sidecars, and log
    one warning saying why; returns the trusted records by task number. Files without a record are left:
    they may be another part's task in progress."""
    trusted: dict[int, dict[str, Any]] = {}
    stale: Counter[str] = Counter()
    n_stale = 0
    for index, files in sorted(source_files(out, source).items()):
        record_path = _record_path(out, task_stem(source, index))
        if record_path not in files:
            continue
        record = _load_record(record_path)
        reasons = record_reasons(out, record, fp)
        if reasons:
            _remove(files)
            stale.update(reasons)
            n_stale += 1
        elif record is not None:
            trusted[index] = record
    if n_stale:
        log.warning(
            "%s: %d finished task(s) in %s are stale (%s); removing and rebuilding them",
            source, n_stale, out, ", ".join(sorted(stale)),
        )  # fmt: skip
    return trusted


def _remove_beyond(out: Path, source: str, n_tasks: int) -> None:
    """Remove the files of tasks numbered ``n_tasks`` and up (the source has fewer items or larger tasks
    than when they were built), and their temporary folders."""
    beyond = {i: files for i, files in source_files(out, source).items() if i >= n_tasks}
    for files in beyond.values():
        _remove(files)
    if beyond:
        log.info("%s: removed the files of %d task(s) beyond its %d tasks", source, len(beyond), n_tasks)
    pattern = re.compile(rf"\.tmp-{re.escape(source)}-(\d{{6}})")
    for entry in os.scandir(out):
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) >= n_tasks:
            shutil.rmtree(out / entry.name, ignore_errors=True)


def _task_files(out: Path, source: str, index: int) -> list[Path]:
    """The files of one task, as on disk now."""
    pattern = _file_pattern(source)
    matches = ((p, pattern.fullmatch(p.name)) for p in out.glob(f"{task_stem(source, index)}*"))
    return [p for p, m in matches if m and int(m.group(1)) == index]


# ---- one task ----------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _encode_into(
    writer: wds.ShardWriter, source: SourceConfig, task: Task, items: list[Any], max_images: int
) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Write the task's samples; returns ``(samples per tar name, skipped per reason, normalised per rule)``."""
    skipped: Counter[str] = Counter()
    normalised: Counter[str] = Counter()
    per_file: Counter[str] = Counter()
    for offset, item in enumerate(items):
        try:
            sample = encode_item(source, item, task.start + offset, max_images)
        except Skip as e:
            skipped[e.reason] += 1
            continue
        normalised.update(sample.pop(NOTES_KEY, ()))
        writer.write(sample)
        per_file[Path(writer.fname).name] += 1
    return per_file, skipped, normalised


def _publish(tmp: Path, out: Path, name: str, samples: int, source: str) -> dict[str, Any]:
    """Index a finished tar, then move its sidecar and then the tar into ``out``; returns its shard entry."""
    sidecar = write_index(tmp / name)
    entry = {
        "path": name,
        "index": sidecar.name,
        "samples": samples,
        "bytes": (tmp / name).stat().st_size,
        "sha256": _sha256(tmp / name),
        "source": source,
    }
    os.replace(sidecar, out / sidecar.name)  # first: a tar in the output folder always has its index
    os.replace(tmp / name, out / name)
    return entry


def run_task(
    source: SourceConfig,
    task: Task,
    items: list[Any],
    out: Path,
    settings: ShardSettings,
    fp: dict[str, Any],
) -> dict[str, Any]:
    """Encode one task's items into tars (see the module docstring); returns its record."""
    tmp = out / f".tmp-{task.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = wds.ShardWriter(
        str(tmp / f"{task.stem}-%03d.tar"),
        maxcount=1 << 62,
        maxsize=settings.max_shard_bytes,
        verbose=0,
        mtime=0.0,
    )
    try:
        per_file, skipped, normalised = _encode_into(writer, source, task, items, settings.max_images)
    finally:
        writer.close()
    shards = [_publish(tmp, out, name, per_file[name], task.source) for name in sorted(per_file)]
    shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "task": task.stem,
        "source": task.source,
        "items": len(items),
        "written": sum(per_file.values()),
        "skipped": dict(skipped),
        "normalised": dict(normalised),
        "shards": shards,
        "fingerprint": fp,
    }
    _write_json_atomic(_record_path(out, task.stem), record)  # last: it marks the task done
    return record


# ---- the build ---------------------------------------------------------------------------------------------
class _Runner:
    """Runs tasks inline (``workers <= 1``) or in a process pool with at most ``2 x workers`` in flight, so
    that the items waiting for a worker stay bounded; ``on_done`` gets each record."""

    def __init__(self, workers: int, on_done: Callable[[dict[str, Any]], None]) -> None:
        self.workers = workers
        self.on_done = on_done
        self.pool: ProcessPoolExecutor | None = None
        self.in_flight: deque[Future] = deque()

    def submit(self, *job: Any) -> None:
        if self.workers <= 1:
            self.on_done(run_task(*job))
            return
        if self.pool is None:  # started on the first task to build: a finished build forks nothing
            self.pool = ProcessPoolExecutor(max_workers=self.workers)
        self.in_flight.append(self.pool.submit(run_task, *job))
        while len(self.in_flight) >= 2 * self.workers:
            self.on_done(self.in_flight.popleft().result())

    def finish(self) -> None:
        while self.in_flight:
            self.on_done(self.in_flight.popleft().result())

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def cut(
    items: Iterable[Any], size: int, keep: Callable[[int], bool]
) -> Iterator[tuple[int, int, int, list[Any] | None]]:
    """``(task number, start, end, items)`` of consecutive tasks of ``size`` items; ``items`` is None for
    the tasks ``keep`` rejects, whose items are counted but never held."""
    index, start, seen, batch = 0, 0, 0, []
    kept = keep(index)
    for item in items:
        if seen == start + size:
            yield index, start, seen, batch if kept else None
            index, start, batch = index + 1, seen, []
            kept = keep(index)
        if kept:
            batch.append(item)
        seen += 1
    if seen > start:
        yield index, start, seen, batch if kept else None


def _build_source(
    source: SourceConfig,
    out: Path,
    settings: ShardSettings,
    fp: dict[str, Any],
    trusted: dict[int, dict[str, Any]],
    mine: Callable[[int], bool],
    runner: _Runner,
) -> int:
    """Stream one source and submit its tasks that ``mine`` owns and no trusted record covers; returns the
    source's number of tasks."""
    n_tasks = 0

    def to_build(index: int) -> bool:
        return mine(index) and index not in trusted

    for index, start, end, items in cut(read_items(source), settings.samples_per_shard, to_build):
        n_tasks = index + 1
        if not mine(index):
            continue
        if items is None:
            runner.on_done(trusted[index])
            continue
        _remove(_task_files(out, source.name, index))  # renamed before an interruption, record missing
        runner.submit(source, Task(source.name, index, start, end), items, out, settings, fp)
    _remove_beyond(out, source.name, n_tasks)
    return n_tasks


def _same_file(a: str, b: str) -> bool:
    if os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b)):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def refuse_other_recipes_shards(out: Path, recipe: Recipe, prints: dict[str, dict[str, Any]]) -> None:
    """A build replaces stale shards of its own recipe only: shards in ``out`` that another recipe file built
    (a same-named recipe elsewhere, a source of the same name) are never deleted; the build is refused."""
    if not (out / MANIFEST).exists():
        return
    built = load_manifest(out)
    if _same_file(str(built.get("recipe", "")), recipe.path):
        return
    clashes = [
        name for name, source in built.get("sources", {}).items()
        if name in prints and stale_reasons(source.get("fingerprint"), prints[name])
    ]  # fmt: skip
    if clashes:
        raise ValueError(
            f"{out} holds shards that recipe {built.get('recipe')} built; building {recipe.path} there would "
            f"replace its sources {clashes}: build into another folder (--out / data.shards)"
        )


def _owner(first: int, k: int, n: int) -> Callable[[int], bool]:
    """Whether part ``k`` of ``n`` builds a source's task, given the number of its first task."""
    return lambda index: (first + index) % n == k


def build(
    recipe: Recipe,
    out: str | Path,
    part: str | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Build (or resume) the recipe's shards, or part ``K/N`` of them; returns the manifest written.
    ``progress`` gets the number of input items of each task of this part as it is built or found done."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k, n = parse_part(part)
    prints = {s.name: fingerprint(s, recipe.shards) for s in recipe.sources}
    refuse_other_recipes_shards(out, recipe, prints)
    trusted = {s.name: remove_stale(out, s.name, prints[s.name]) for s in recipe.sources}
    records: list[dict[str, Any]] = []

    def done(record: dict[str, Any]) -> None:
        records.append(record)
        if progress:
            progress(record.get("items", record["written"] + sum(record["skipped"].values())))

    first = 0  # the number of the source's first task across the recipe: parts split as a whole build does
    with _Runner(workers, done) as runner:
        for s in recipe.sources:
            mine = _owner(first, k, n)
            first += _build_source(s, out, recipe.shards, prints[s.name], trusted[s.name], mine, runner)
        runner.finish()
    manifest = _manifest(records, recipe, f"{k}/{n}", prints)
    _write_json_atomic(out / (MANIFEST if n == 1 else f"manifest-part-{k}-of-{n}.json"), manifest)
    return manifest


# ---- manifests ---------------------------------------------------------------------------------------------
def _add_counts(
    sources: dict[str, dict[str, Any]],
    name: str,
    written: int,
    skipped: dict[str, int],
    normalised: dict[str, int] | None = None,
) -> None:
    entry = sources[name]
    entry["written"] += written
    for key, counts in (("skipped", skipped), ("normalised", normalised or {})):
        for reason, count in counts.items():  # "normalised" appears only when something was
            entry.setdefault(key, {})
            entry[key][reason] = entry[key].get(reason, 0) + count


def _manifest(
    records: list[dict[str, Any]], recipe: Recipe, part: str, prints: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    # weight is kept for information only: training reads the weights from the recipe.
    sources = {
        s.name: {
            "written": 0,
            "skipped": {},
            "weight": s.weight,
            "format": s.format,
            "fingerprint": prints[s.name],
        }
        for s in recipe.sources
    }
    for s in recipe.sources:
        if s.format == "synthetic":  # so that shards of an older generator are recognised and rebuilt
            sources[s.name]["generator_version"] = GENERATOR_VERSION
    for r in records:
        _add_counts(sources, r["source"], r["written"], r["skipped"], r.get("normalised"))
    shards = sorted((sh for r in records for sh in r["shards"]), key=lambda sh: sh["path"])
    return {
        "recipe": recipe.path,
        "recipe_name": Path(recipe.path).stem,
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
    prints = [{name: s.get("fingerprint") for name, s in m["sources"].items()} for m in loaded]
    if any(p != prints[0] for p in prints):
        raise ValueError(f"{out}: the parts were built from different recipes or settings; rebuild them")
    sources = {
        name: {**{k: v for k, v in s.items() if k != "normalised"}, "written": 0, "skipped": {}}
        for name, s in loaded[0]["sources"].items()
    }
    for m in loaded:
        for name, s in m["sources"].items():
            _add_counts(sources, name, s["written"], s["skipped"], s.get("normalised"))
    shards = sorted((sh for m in loaded for sh in m["shards"]), key=lambda sh: sh["path"])
    first = loaded[0]
    manifest = {
        "recipe": first["recipe"],
        "recipe_name": first.get("recipe_name", Path(first["recipe"]).stem),
        "part": "0/1",
        "max_images": first.get("max_images", 0),
        "sources": sources,
        "shards": shards,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{folder}: no {MANIFEST}; build shards first (fvl shards build RECIPE --out {folder})"
        )
    return json.loads(path.read_text())
