"""The Lightning DataModule: shards built on first use, streamed per rank and worker, plus an on-the-fly
synthetic validation split."""

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
from fvl.data.pipeline import SampleProcessor, make_dataset
from fvl.data.recipes import load_recipe
from fvl.data.shards import MANIFEST, build, load_manifest
from fvl.data.synthetic import GENERATOR_VERSION, generate

log = logging.getLogger(__name__)


def shard_urls(
    folder: str | Path, manifest: dict[str, Any], sources: list[str] | None = None
) -> dict[str, list[str]]:
    """Shard paths per source from a manifest, restricted to ``sources`` (all when empty)."""
    folder = Path(folder)
    wanted = list(sources) if sources else list(manifest["sources"])
    unknown = [s for s in wanted if s not in manifest["sources"]]
    if unknown:
        raise ValueError(f"data.sources: {unknown} not in the shards' manifest ({list(manifest['sources'])})")
    urls = {s: [str(folder / sh["path"]) for sh in manifest["shards"] if sh["source"] == s] for s in wanted}
    empty = [s for s, u in urls.items() if not u]
    if empty:
        raise ValueError(f"{folder}: no shards for sources {empty} (every sample skipped? see {MANIFEST})")
    return urls


def ensure_shards(cfg: DataConfig, progress: bool = True) -> dict[str, Any]:
    """The shards' manifest, building them from the recipe first when the folder has none."""
    folder = Path(cfg.shards)
    if (folder / MANIFEST).exists() and _stale_synthetic(load_manifest(folder)):
        log.warning("%s was built by an older synthetic generator: rebuilding it", folder)
        shutil.rmtree(folder)
    if not (folder / MANIFEST).exists():
        recipe = load_recipe(cfg.recipe)
        log.warning("building shards of %s into %s (first use)", recipe.path, folder)
        build(recipe, folder, workers=cfg.build_workers)
    return load_manifest(folder)


def _stale_synthetic(manifest: dict[str, Any]) -> bool:
    return any(
        s.get("format") == "synthetic" and s.get("generator_version") != GENERATOR_VERSION
        for s in manifest["sources"].values()
    )


class FVLDataModule(L.LightningDataModule):
    """Training batches from shards and a synthetic validation split, tokenised for ``model``."""

    def __init__(self, cfg: DataConfig, model, stage: str = "pretrain", seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage = stage
        self.seed = seed
        mode = cfg.resize_mode or ("square" if stage == "pretrain" else "pad")
        self.processor = SampleProcessor.for_model(model, mode)
        self.pad_token_id = model.tokenizer.pad_token_id
        self.manifest: dict[str, Any] | None = None

    def prepare_data(self) -> None:  # rank 0 of each node: build missing shards
        ensure_shards(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        self.manifest = load_manifest(self.cfg.shards)
        self.urls = shard_urls(self.cfg.shards, self.manifest, list(self.cfg.sources))
        self.weights = {s: float(self.manifest["sources"][s]["weight"]) for s in self.urls}
        self.total = sum(self.manifest["sources"][s]["written"] for s in self.urls)
        rank, world = self._rank_world()
        if not self.cfg.resampled and world > 1:
            raise ValueError(
                f"data.resampled=false with {world} ranks: ranks would see different batch counts and "
                "DDP would hang at the end of the epoch; set data.resampled=true for multi-rank training"
            )
        shards = min(len(u) for u in self.urls.values())
        if not self.cfg.resampled and shards < max(1, self.cfg.num_workers):
            log.warning("only %d shards for %d workers: some workers will idle", shards, self.cfg.num_workers)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    @property
    def epoch_samples(self) -> int:
        return self.cfg.epoch_samples or self.total

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = make_dataset(
            self.urls, self.weights, self.processor, self.cfg.batch_size, self.pad_token_id, rank, world,
            self.cfg.resampled, self.epoch_samples, self.cfg.num_workers, self.cfg.shuffle_buffer, self.seed,
        )  # fmt: skip
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
        task = "caption" if self.processor.template.name == "plain" else "qa"
        samples = []
        for i in range(self.cfg.val_samples):
            s = generate(i, "val", self.seed)  # drawn at 64 px; the processor resizes for the tower
            samples.append(self.processor.from_conversation(s.conversations(task), [s.image], s.id))
        return DataLoader(
            samples, batch_size=self.cfg.batch_size, collate_fn=lambda b: collate(b, self.pad_token_id)
        )
