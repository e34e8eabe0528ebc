"""Data: recipes, the synthetic generator, shard building, epoch plans, random-access reading, the
DataModule. ``fvl.data.build_datamodule(cfg, stage)`` gives a stage's LightningDataModule from a loaded
config, without a model."""

from __future__ import annotations

from typing import Any

__all__ = ["build_datamodule"]


def __getattr__(name: str) -> Any:
    # Imported on use: fvl.models imports fvl.inputs.collate, and the DataModule imports fvl.models.
    if name == "build_datamodule":
        from fvl.data.datamodule import build_datamodule

        return build_datamodule
    raise AttributeError(f"module 'fvl.data' has no attribute {name!r}")
