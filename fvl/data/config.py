"""Typed schema of ``data:`` in an experiment YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

VAL_SPLITS = ("synthetic", "heldout")


@dataclass
class DataConfig:
    """What a stage reads and how.

    recipe: a recipe YAML, or a name in ``data_recipes/`` (default ``synthetic``).
    shards: folder of built shards; built from the recipe first when it has no ``manifest.json``.
    sources: names of the recipe's sources to read (empty: all), mixed by their recipe weights.
    batch_size: micro batch per device.
    num_workers: DataLoader worker processes.
    shuffle_buffer: samples held for shuffling (0: read in shard order).
    resampled: draw shards with replacement and give every rank the same number of batches per epoch
      (what multi-rank training needs); false reads every sample exactly once per epoch.
    epoch_samples: samples per epoch over all ranks when resampled (0: the manifest's total).
    build_workers: processes used to build missing shards.
    val_split: where validation samples come from: ``synthetic`` (generated on the fly for the stage's
      ``val_task``) | ``heldout`` (the last ``val_shards`` shards of every source read, kept out of training).
    val_shards: shards per source held out when ``val_split=heldout``.
    val_samples: validation samples over all ranks (0: no validation).
    """

    recipe: str = "synthetic"
    shards: str = "shards/synthetic"
    sources: list[str] = field(default_factory=list)
    batch_size: int = 32
    num_workers: int = 1
    shuffle_buffer: int = 1000
    resampled: bool = True
    epoch_samples: int = 0
    build_workers: int = 2
    val_split: str = "synthetic"
    val_shards: int = 1
    val_samples: int = 256

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError("data.batch_size must be positive")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.epoch_samples < 0 or self.val_samples < 0:
            raise ValueError("data.num_workers, shuffle_buffer, epoch_samples and val_samples must be >= 0")
        if self.val_split not in VAL_SPLITS:
            raise ValueError(f"data.val_split={self.val_split!r}: expected one of {', '.join(VAL_SPLITS)}")
        if self.val_shards <= 0:
            raise ValueError("data.val_shards must be positive")
