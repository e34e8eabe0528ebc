"""Typed schema of ``data:`` in an experiment YAML."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

VAL_SPLITS = ("synthetic", "heldout")


@dataclass
class DataConfig:
    """What a stage reads and how.

    recipe: a recipe YAML, or a name in ``data_recipes/`` (default ``synthetic``). The shards must have been
      built from it (their manifest names it).
    shards: folder of built shards; the synthetic recipe is built there on first use, a real one with
      ``fvl shards build RECIPE --out DIR``.
    sources: names of the recipe's sources to read (empty: all).
    weights: passes per epoch over a source, overriding the recipe's ``weight`` (``data.weights.NAME=0.5``:
      half of its samples each epoch, a different half the next; 2: each sample twice). Read at training
      time: no rebuild needed.
    batch_size: micro batch per device.
    num_workers: DataLoader worker processes (they change speed, never what is read).
    group_by_length: batch samples of similar length and the same modality (LLaVA's modality-length
      grouping); ``train/padding_fraction`` shows the effect.
    length_window: global steps sorted together when grouping by length (larger: tighter batches, less
      randomness in batch order).
    packing: pack each batch's samples into as few rows of ``model.text.max_length`` tokens as fit, without
      padding between them (``position_ids`` restart per sample; attention stays within a sample). The loss
      is unchanged (the mean over supervised tokens); the rows per batch vary.
    pack_length: tokens per packed row (0: ``model.text.max_length``). With flash-attention on a GPU, a
      batch's worth (batch_size x max_length) flattens each batch into one row and removes the padding
      entirely; under SDPA or eager attention the mask grows with the square of it.
    feature_cache: a feature cache folder (``fvl features build CHECKPOINT --shards DIR --out DIR``): the
      stage reads each image's fused features from it instead of running the vision tower. Only for stages
      whose tower and fusion train nothing (finetune, align); a cache built from another checkpoint, fusion,
      feature set, resize mode or other shards is refused. Empty: no cache.
    build_workers: processes used to build missing shards.
    val_split: where validation samples come from: ``synthetic`` (generated on the fly for the stage's
      ``val_task``) | ``heldout`` (the last ``val_shards`` shards of every source read, kept out of training).
    val_shards: shards per source held out when ``val_split=heldout``.
    val_samples: validation samples over all ranks (0: no validation).

    An epoch is one pass as the weights say, in a seeded order (``seed``), split evenly over ranks; see
    ``fvl.data.plan``. ``resume=last`` continues it at the batch where the checkpoint was taken.
    """

    recipe: str = "synthetic"
    shards: str = "shards/synthetic"
    sources: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    batch_size: int = 32
    num_workers: int = 1
    group_by_length: bool = False
    length_window: int = 32
    packing: bool = False
    pack_length: int = 0
    feature_cache: str = ""
    build_workers: int = 2
    val_split: str = "synthetic"
    val_shards: int = 1
    val_samples: int = 256

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError("data.batch_size must be positive")
        if self.num_workers < 0 or self.val_samples < 0:
            raise ValueError("data.num_workers and data.val_samples must be >= 0")
        if self.pack_length < 0:
            raise ValueError("data.pack_length must be >= 0 (0: model.text.max_length)")
        if self.length_window <= 0:
            raise ValueError("data.length_window must be positive")
        if self.val_split not in VAL_SPLITS:
            raise ValueError(f"data.val_split={self.val_split!r}: expected one of {', '.join(VAL_SPLITS)}")
        if self.val_shards <= 0:
            raise ValueError("data.val_shards must be positive")
        bad = {k: w for k, w in self.weights.items() if not (w >= 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"data.weights {bad}: a weight is passes per epoch, a finite number >= 0")
