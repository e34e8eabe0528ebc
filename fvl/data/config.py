"""Typed schema of ``data:`` in an experiment YAML."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    resize_mode: ``square`` (stage 1) or ``pad`` (stage 2, pad to square with the mean colour); empty: by stage.
    build_workers: processes used to build missing shards.
    val_samples: size of the synthetic validation split generated on the fly (0: no validation).
    """

    recipe: str = "synthetic"
    shards: str = "shards/synthetic"
    sources: list[str] = field(default_factory=list)
    batch_size: int = 32
    num_workers: int = 1
    shuffle_buffer: int = 1000
    resampled: bool = True
    epoch_samples: int = 0
    resize_mode: str = ""
    build_workers: int = 2
    val_samples: int = 256

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError("data.batch_size must be positive")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.epoch_samples < 0 or self.val_samples < 0:
            raise ValueError("data.num_workers, shuffle_buffer, epoch_samples and val_samples must be >= 0")
        if self.resize_mode not in ("", "square", "pad"):
            raise ValueError(f"data.resize_mode={self.resize_mode!r}: expected square, pad or empty")
