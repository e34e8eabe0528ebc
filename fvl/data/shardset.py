"""Which shards a stage reads: the shards of the chosen sources listed in a manifest, with each shard's sample
count, minus the shards held out for validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvl.data.shards import MANIFEST


@dataclass
class ShardSet:
    """Shard paths per source (in manifest order) and the sample count of every shard."""

    urls: dict[str, list[str]]
    shard_samples: dict[str, int]

    @property
    def samples(self) -> dict[str, int]:
        return {s: sum(self.shard_samples.get(u, 0) for u in urls) for s, urls in self.urls.items()}

    @property
    def total(self) -> int:
        return sum(self.samples.values())


def shard_set(folder: str | Path, manifest: dict[str, Any], sources: list[str] | None = None) -> ShardSet:
    """The shards of ``sources`` (all when empty) listed in a manifest."""
    folder = Path(folder)
    wanted = list(sources) if sources else list(manifest["sources"])
    unknown = [s for s in wanted if s not in manifest["sources"]]
    if unknown:
        raise ValueError(f"data.sources: {unknown} not in the shards' manifest ({list(manifest['sources'])})")
    urls = {s: [str(folder / sh["path"]) for sh in manifest["shards"] if sh["source"] == s] for s in wanted}
    empty = [s for s, u in urls.items() if not u]
    if empty:
        raise ValueError(f"{folder}: no shards for sources {empty} (every sample skipped? see {MANIFEST})")
    return ShardSet(urls, {str(folder / sh["path"]): int(sh.get("samples", 0)) for sh in manifest["shards"]})


def hold_out(shards: ShardSet, per_source: int) -> tuple[ShardSet, ShardSet]:
    """``(training shards, held-out shards)``: the last ``per_source`` shards of every source leave training."""
    short = {s: len(u) for s, u in shards.urls.items() if len(u) <= per_source}
    if short:
        raise ValueError(
            f"data.val_split=heldout: sources {short} have no more shards than data.val_shards={per_source}; "
            "lower it, write smaller shards (shards.samples_per_shard) or use data.val_split=synthetic"
        )
    train = {s: u[:-per_source] for s, u in shards.urls.items()}
    held = {s: u[-per_source:] for s, u in shards.urls.items()}
    return ShardSet(train, shards.shard_samples), ShardSet(held, shards.shard_samples)
