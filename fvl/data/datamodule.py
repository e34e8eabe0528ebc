"""The Lightning DataModule: shards built on first use, streamed per rank and worker through a
``Processor`` (the model is never needed), plus a validation split: generated on the fly (synthetic) or
shards held out of training (real recipes)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from fvl.data.collate import collate
from fvl.data.config import DataConfig
from fvl.data.pipeline import ShardSet, heldout_dataset, make_dataset
from fvl.data.recipes import load_recipe
from fvl.data.shards import MANIFEST, build, load_manifest
from fvl.data.synthetic import GENERATOR_VERSION, generate
from fvl.models.processor import Processor

log = logging.getLogger(__name__)


def shard_set(folder: str | Path, manifest: dict[str, Any], sources: list[str] | None = None) -> ShardSet:
    """The shards of ``sources`` (all when empty) listed in a manifest, with weights and sample counts."""
    folder = Path(folder)
    wanted = list(sources) if sources else list(manifest["sources"])
    unknown = [s for s in wanted if s not in manifest["sources"]]
    if unknown:
        raise ValueError(f"data.sources: {unknown} not in the shards' manifest ({list(manifest['sources'])})")
    urls = {s: [str(folder / sh["path"]) for sh in manifest["shards"] if sh["source"] == s] for s in wanted}
    empty = [s for s, u in urls.items() if not u]
    if empty:
        raise ValueError(f"{folder}: no shards for sources {empty} (every sample skipped? see {MANIFEST})")
    return ShardSet(
        urls,
        {s: float(manifest["sources"][s]["weight"]) for s in wanted},
        {str(folder / sh["path"]): int(sh.get("samples", 0)) for sh in manifest["shards"]},
    )


def hold_out(shards: ShardSet, per_source: int) -> tuple[ShardSet, list[str], int]:
    """``(training shards, held-out shard paths, held-out samples)``: the last ``per_source`` shards of
    every source leave the training set."""
    short = {s: len(u) for s, u in shards.urls.items() if len(u) <= per_source}
    if short:
        raise ValueError(
            f"data.val_split=heldout: sources {short} have no more shards than data.val_shards={per_source}; "
            "lower it, write smaller shards (shards.samples_per_shard) or use data.val_split=synthetic"
        )
    train = {s: u[:-per_source] for s, u in shards.urls.items()}
    held = [url for u in shards.urls.values() for url in u[-per_source:]]
    return (
        ShardSet(train, shards.weights, shards.shard_samples),
        held,
        sum(shards.shard_samples[u] for u in held),
    )


def ensure_shards(cfg: DataConfig, max_images: int = 0) -> dict[str, Any]:
    """The shards' manifest, building them from the recipe first when the folder has none; ``max_images``
    (the model's limit) applies when the recipe sets none."""
    folder = Path(cfg.shards)
    if (folder / MANIFEST).exists() and _stale_synthetic(load_manifest(folder)):
        log.warning("%s was built by an older synthetic generator: rebuilding it", folder)
        shutil.rmtree(folder)
    if not (folder / MANIFEST).exists():
        recipe = load_recipe(cfg.recipe)
        recipe.shards.max_images = recipe.shards.max_images or max_images
        log.warning("building shards of %s into %s (first use)", recipe.path, folder)
        build(recipe, folder, workers=cfg.build_workers)
    return load_manifest(folder)


def _stale_synthetic(manifest: dict[str, Any]) -> bool:
    return any(
        s.get("format") == "synthetic" and s.get("generator_version") != GENERATOR_VERSION
        for s in manifest["sources"].values()
    )


class FVLDataModule(L.LightningDataModule):
    """Training batches from shards and a validation split, prepared by ``processor``.

    val_task: the task of the synthetic validation split (the stage's ``val_task``: ``caption`` | ``qa``).
    """

    def __init__(
        self, cfg: DataConfig, processor: Processor, val_task: str = "caption", seed: int = 0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.processor = processor
        self.val_task = val_task
        self.seed = seed
        self.shards: ShardSet | None = None
        self.val_urls: list[str] = []
        self.val_available = 0

    def prepare_data(self) -> None:  # rank 0 of each node: build missing shards
        ensure_shards(self.cfg, self.processor.max_images)

    def setup(self, stage: str | None = None) -> None:
        manifest = load_manifest(self.cfg.shards)
        self.shards = shard_set(self.cfg.shards, manifest, list(self.cfg.sources))
        if self.cfg.val_samples and self.cfg.val_split == "heldout":
            self.shards, self.val_urls, self.val_available = hold_out(self.shards, self.cfg.val_shards)
        rank, world = self._rank_world()
        if not self.cfg.resampled and world > 1:
            raise ValueError(
                f"data.resampled=false with {world} ranks: ranks would see different batch counts and "
                "DDP would hang at the end of the epoch; set data.resampled=true for multi-rank training"
            )
        shards = min(len(u) for u in self.shards.urls.values())
        if not self.cfg.resampled and shards < max(1, self.cfg.num_workers):
            log.warning("only %d shards for %d workers: some workers will idle", shards, self.cfg.num_workers)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = make_dataset(self.cfg, self.shards, self.processor, rank, world, self.seed)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.cfg.val_samples:
            return []
        if self.cfg.val_split == "heldout":
            rank, world = self._rank_world()
            per_rank = min(self.cfg.val_samples, self.val_available) // world
            if per_rank == 0:
                raise ValueError(
                    f"data.val_split=heldout: {self.val_available} held-out samples for {world} ranks"
                )
            return DataLoader(
                heldout_dataset(self.val_urls, self.processor, self.cfg.batch_size, per_rank, rank, world),
                batch_size=None,
            )
        samples = []
        for i in range(self.cfg.val_samples):
            s = generate(i, "val", self.seed)  # drawn at 64 px; the processor resizes for the tower
            samples.append(self.processor(s.conversations(self.val_task), [s.image], s.id))
        return DataLoader(
            samples,
            batch_size=self.cfg.batch_size,
            collate_fn=lambda b: collate(b, self.processor.pad_token_id),
        )
