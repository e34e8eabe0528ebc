"""The Lightning DataModule: shards checked against the recipe (and the synthetic recipe built on first use),
an epoch plan per rank (``fvl.data.plan``) read by random access (``fvl.data.reader``), and a validation
split: generated on the fly (synthetic) or shards held out of training (real recipes). The model is never
needed: a ``Processor`` built from ``cfg.model`` prepares the samples.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from fvl.config import ExperimentConfig
from fvl.config.data import DataConfig
from fvl.data.feature_cache.store import (
    FUSION_KEYS,
    FeatureSelection,
    FeatureSpans,
    check_cache,
    load_cache_manifest,
)
from fvl.data.plan import EpochBatches, PlanSettings
from fvl.data.reader import ONE_ROW, Catalog, PlannedLoader, ShardReader, as_is
from fvl.data.recipes import Recipe, load_recipe, resolve_recipe_path
from fvl.data.shards import MANIFEST, build, load_manifest, recipe_drift
from fvl.data.shardset import ShardSet, hold_out, shard_set
from fvl.inputs.collate import collate
from fvl.inputs.processor import Processor
from fvl.synthetic import generate

log = logging.getLogger(__name__)


def is_synthetic(recipe: Recipe) -> bool:
    return all(s.format == "synthetic" for s in recipe.sources)


def check_recipe(manifest: dict[str, Any], folder: str | Path, recipe_path: Path) -> None:
    """Refuse shards built from another recipe than ``data.recipe``: same file, or same name and sources."""
    built = manifest.get("recipe", "")
    same_file = bool(built) and Path(built).exists() and Path(built).resolve() == recipe_path.resolve()
    name = manifest.get("recipe_name") or Path(built).stem
    same_name = name == recipe_path.stem
    if same_file or same_name:
        return
    raise ValueError(
        f"{folder} holds shards of recipe {name!r} ({built}), but data.recipe is {recipe_path.stem!r} "
        f"({recipe_path}); point data.shards at that recipe's shards, or build them with "
        f"fvl shards build {recipe_path} --out DIR"
    )


def ensure_shards(cfg: DataConfig, max_images: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """The shards' manifest. The synthetic recipe is built (or brought up to date: the build only redoes
    what changed) here; a real recipe's shards must exist, since hours of building inside a multi-rank start
    would time out the other ranks. ``max_images`` (the model's limit) applies when the recipe sets none."""
    folder = Path(cfg.shards)
    recipe = load_recipe(cfg.recipe, check_files=False)
    recipe_path = Path(recipe.path)
    if (folder / MANIFEST).exists():
        check_recipe(load_manifest(folder), folder, recipe_path)
        if not is_synthetic(recipe):
            manifest = load_manifest(folder)
            drift = recipe_drift(manifest, recipe)
            if drift:  # a real recipe's build is not training's to redo (hours, one rank): refuse
                raise ValueError(
                    f"{folder}: the shards are not what recipe {recipe_path} now describes: "
                    + "; ".join(drift)
                    + f". Rebuild them (only what changed is redone): fvl shards build {recipe_path} --out {folder}"
                )
            check_image_limit(manifest, folder, recipe_path, recipe.shards.max_images or max_images)
            return manifest
    elif not is_synthetic(recipe):
        command = f"fvl shards build {recipe_path} --out {folder}"
        if world_size > 1:
            raise FileNotFoundError(
                f"{folder}: no shards of recipe {recipe_path.stem!r}; build them before a {world_size}-rank "
                f"run (building inside it would time out the other ranks): {command}"
            )
        log.warning("%s: no shards yet; building recipe %s first (same as: %s)", folder, recipe_path, command)
    recipe = load_recipe(cfg.recipe)  # now with its files checked
    recipe.shards.max_images = recipe.shards.max_images or max_images
    return _build_with_progress(recipe, folder, cfg.build_workers, progress)


def check_image_limit(manifest: dict, folder: Path, recipe_path: Path, max_images: int) -> None:
    """Refuse shards that skipped samples for having more images than an earlier, smaller limit allowed
    (shards that training built for a model with a shorter ``max_length``): this model could read them."""
    built = int(manifest.get("max_images") or 0)
    if not built or (max_images and max_images <= built):
        return
    lost = sum(s.get("skipped", {}).get("too_many_images", 0) for s in manifest["sources"].values())
    if lost:
        now = f"up to {max_images}" if max_images else "any number of"
        raise ValueError(
            f"{folder}: these shards were built for at most {built} image(s) a sample and skipped {lost} "
            f"sample(s) with more as too_many_images; this model fits {now} images: rebuild them with "
            f"fvl shards build {recipe_path} --out {folder}"
            + (f" --max-images {max_images}" if max_images else "")
        )


def _build_with_progress(recipe: Recipe, folder: Path, workers: int, progress: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(s.num_samples for s in recipe.sources if s.format == "synthetic") or None
    columns = (TextColumn(f"[bold]shards of {Path(recipe.path).stem}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("build", total=total)
        return build(recipe, folder, workers=workers, progress=lambda n: bar.advance(task, n))


def read_weights(cfg: DataConfig, sources: list[str]) -> dict[str, float]:
    """Passes per epoch of each source read: the recipe's ``weight`` (read now, not from the manifest),
    overridden by ``data.weights``."""
    recipe = load_recipe(cfg.recipe, check_files=False)
    weights = {s.name: float(s.weight) for s in recipe.sources}
    unknown = sorted(set(cfg.weights) - set(weights))
    if unknown:
        raise ValueError(
            f"data.weights: {unknown} are not sources of recipe {recipe.path} ({sorted(weights)})"
        )
    weights.update({k: float(v) for k, v in cfg.weights.items()})
    chosen = {s: weights[s] for s in sources}
    if not any(w > 0 for w in chosen.values()):
        raise ValueError(f"data.weights: every source read has weight 0 ({chosen})")
    return chosen


def val_seed(cfg: DataConfig, task: str) -> int:
    """The seed of the synthetic validation split: the recipe's (its first synthetic source of ``task``,
    else its first synthetic source; 0 for a real recipe), never the run's, so that runs of different seeds
    are validated on the same samples."""
    sources = [s for s in load_recipe(cfg.recipe, check_files=False).sources if s.format == "synthetic"]
    chosen = [s for s in sources if s.task == task] or sources
    return chosen[0].seed if chosen else 0


class FVLDataModule(L.LightningDataModule):
    """Training batches planned per epoch and rank, and a validation split, prepared by ``processor``.

    val_task: the task of the synthetic validation split (the stage's ``val_task``: ``caption`` | ``qa``).
    seed: fixes every epoch's order (with the epoch number); not the validation samples (``val_seed``).
    feature_identity: the model's ``fvl.data.feature_cache.identity_of`` when ``data.feature_cache`` is set
        (the trainer passes it): the cache must match it. Without it only the shards, the resize mode and the
        feature shape are checked.
    fusion: the model's (parameter-free) fusion module: with it, a cache of features side by side (``fvl
        features build --all-features``) serves this run whatever subset it fuses, fused as it is read.
    """

    def __init__(
        self,
        cfg: DataConfig,
        processor: Processor,
        val_task: str = "caption",
        seed: int = 0,
        feature_identity: dict[str, Any] | None = None,
        fusion: torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.processor = processor
        self.val_task = val_task
        # Micro batches per optimizer step (the trainer's gradient accumulation): the loader counts each
        # step's supervised tokens ahead (``step_supervised``) for the loss of one big batch.
        self.step_batches = 1
        # flash-attention keeps packed samples apart only in a batch of one row (transformers takes its
        # variable-length path for batch size 1 alone): pack each micro batch into one row for it
        self.one_row_packing = False
        self.seed = seed
        self.feature_identity = feature_identity
        self.fusion = fusion
        self.train_catalog: Catalog | None = None
        self.data_identity: dict[str, dict] = {}
        self.val_catalog: Catalog | None = None
        self.train_features: FeatureSpans | None = None
        self.val_features: FeatureSpans | None = None
        self.weights: dict[str, float] = {}
        self.setup_skips: dict[str, int] = {}
        self._train_loader: PlannedLoader | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def prepare_data(self) -> None:  # local rank 0 of each node, before the others set up
        ensure_shards(self.cfg, self.processor.max_images, self._rank_world()[1])

    def setup(self, stage: str | None = None) -> None:
        folder = Path(self.cfg.shards)
        if not (folder / MANIFEST).exists() and self._rank_world()[1] == 1:
            self.prepare_data()  # used outside a Trainer: nothing has prepared the data yet
        manifest = load_manifest(folder)
        check_recipe(manifest, folder, resolve_recipe_path(self.cfg.recipe))
        shards = shard_set(folder, manifest, list(self.cfg.sources))
        held: ShardSet | None = None
        if self.cfg.val_samples and self.cfg.val_split == "heldout":
            shards, held = hold_out(shards, self.cfg.val_shards)
        self.weights = read_weights(self.cfg, list(shards.urls))
        self.train_catalog = Catalog.build(shards.urls, shards.shard_samples)
        self.data_identity = shards_identity(manifest, shards, folder)
        self.val_catalog = Catalog.build(held.urls, held.shard_samples) if held else None
        if self.cfg.feature_cache:
            self._attach_cache(manifest, shards, held)
        self.setup_skips = {"corrupt_shard": sum(self.train_catalog.missing.values())}
        if self.setup_skips["corrupt_shard"]:
            log.warning(
                "damaged shards: %s samples listed in %s cannot be read and are skipped (rebuild with "
                "fvl shards build)", self.train_catalog.missing, folder / MANIFEST
            )  # fmt: skip

    def _attach_cache(self, manifest: dict[str, Any], shards: ShardSet, held: ShardSet | None) -> None:
        """Check ``data.feature_cache`` against this run and line its entries up with the samples read."""
        cache = self.cfg.feature_cache
        built = load_cache_manifest(cache)
        read = {u for s in (shards, held) if s is not None for urls in s.urls.values() for u in urls}
        entries = [sh for sh in manifest["shards"] if str(Path(self.cfg.shards) / sh["path"]) in read]
        identity = self.feature_identity or {
            k: built["identity"].get(k) for k in ("weights_sha256", "vision", "fusion", "features")
        }
        expected = {
            **identity,
            "resize_mode": self.processor.transform.mode,
            "tokens": self.processor.image_tokens,
        }
        select = FeatureSelection.between(built["identity"], expected, self.fusion)
        if select is not None:  # features side by side: what the fusion decides is the run's to choose
            expected = {k: v for k, v in expected.items() if k not in FUSION_KEYS}
        check_cache(built, expected, entries, cache)
        self.train_features = FeatureSpans.aligned(
            cache, self.train_catalog.paths, self.train_catalog.shard, select
        )
        if self.val_catalog is not None:
            self.val_features = FeatureSpans.aligned(
                cache, self.val_catalog.paths, self.val_catalog.shard, select
            )
        log.info(
            "data.feature_cache=%s: image features read from the cache (the tower is skipped)%s", cache,
            f"; the run's features fused as read from {built['identity'].get('features')}" if select else "",
        )  # fmt: skip

    def plan(self) -> EpochBatches:
        """This rank's epoch plan over the training catalog."""
        rank, world = self._rank_world()
        settings = PlanSettings(
            self.seed,
            self.weights,
            world,
            rank,
            self.cfg.batch_size,
            self.cfg.length_window if self.cfg.group_by_length else 0,
            self.data_identity,
        )
        lengths, has_image = self.train_catalog.length_hints(self.processor.image_tokens)
        return EpochBatches(self.train_catalog.sources, settings, lengths, has_image)

    def train_dataloader(self) -> PlannedLoader:
        plan = self.plan()
        if len(plan) == 0:
            raise ValueError(f"{self.cfg.shards}: nothing to train on (no samples, or every weight 0)")
        pack = (self.cfg.pack_length or self.processor.max_length or 0) if self.cfg.packing else 0
        if self.cfg.packing and self.one_row_packing:
            pack = ONE_ROW
        if self.cfg.packing and not pack:
            raise ValueError("data.packing needs data.pack_length or model.text.max_length (a row's length)")
        self._train_loader = PlannedLoader(
            ShardReader(self.train_catalog, self.processor, pack=pack, features=self.train_features),
            plan,
            num_workers=self.cfg.num_workers,
            step_batches=self.step_batches,
            pin_memory=torch.cuda.is_available(),
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The data position advances as a batch enters its training step: batches that workers or the
        # trainer's fetcher read ahead are not counted, so a checkpoint records exactly what was trained.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.trained()
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if not self.cfg.val_samples:
            return []
        if self.cfg.val_split == "heldout":
            return self._heldout_loader()
        samples = []
        seed = val_seed(self.cfg, self.val_task)
        for i in range(self.cfg.val_samples):
            s = generate(i, "val", seed)  # drawn at 64 px; the processor resizes for the tower
            samples.append(self.processor(s.conversations(self.val_task), [s.image], s.id))
        return DataLoader(
            samples,
            batch_size=self.cfg.batch_size,
            collate_fn=lambda b: collate(b, self.processor.pad_token_id),
        )

    def _heldout_loader(self) -> DataLoader:
        """The first ``val_samples`` held-out samples in file order, every ``world``-th from ``rank``: every
        rank validates on as many samples (no DDP hang)."""
        rank, world = self._rank_world()
        per_rank = min(self.cfg.val_samples, len(self.val_catalog)) // world
        if per_rank == 0:
            raise ValueError(
                f"data.val_split=heldout: {len(self.val_catalog)} held-out samples for {world} ranks"
            )
        ids = list(range(rank, per_rank * world, world))
        batches = [ids[i : i + self.cfg.batch_size] for i in range(0, len(ids), self.cfg.batch_size)]
        return DataLoader(
            ShardReader(self.val_catalog, self.processor, features=self.val_features),
            sampler=batches,
            batch_size=None,
            collate_fn=as_is,
        )


def shards_identity(manifest: dict[str, Any], shards: ShardSet, folder: Path) -> dict[str, dict]:
    """Per source read: its training samples and a digest of its shards' sha256 (what a resume must match)."""
    by_url = {str(folder / sh["path"]): sh for sh in manifest["shards"]}
    identity = {}
    for source, urls in sorted(shards.urls.items()):
        digest = hashlib.sha256("".join(by_url[u].get("sha256", u) for u in urls).encode()).hexdigest()[:16]
        identity[source] = {"samples": shards.samples[source], "digest": digest}
    return identity


def build_datamodule(
    exp: ExperimentConfig,
    processor: Processor | None = None,
    feature_identity: dict[str, Any] | None = None,
    fusion: torch.nn.Module | None = None,
) -> FVLDataModule:
    """The DataModule of a loaded experiment config (``fvl.config.load``; another stage's data:
    ``fvl.config.with_stage`` first), without building the model. processor: reuse one
    (the model's); default: built from ``cfg.model``. feature_identity: what ``data.feature_cache`` must have
    been built with (``fvl.data.feature_cache.identity_of`` of the model); fusion: the model's fusion (a
    cache of features side by side is then fused for it as read)."""
    from fvl.models.processor import build_processor

    if processor is None:
        processor = build_processor(exp.model)
    processor = processor.with_resize_mode(exp.stage.resize_mode)
    dm = FVLDataModule(exp.data, processor, exp.stage.val_task, exp.seed, feature_identity, fusion)
    dm.one_row_packing = exp.model.llm.attn_implementation == "flash_attention_2"
    return dm
