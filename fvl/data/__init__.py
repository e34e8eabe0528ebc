"""Data: recipes, sources, shards, epoch plans, random-access reading, packing, the feature cache and the
DataModule (``fvl.data.datamodule.build_datamodule(cfg)`` gives a loaded config's LightningDataModule without
a model). Above ``fvl.models`` in the layers: the feature cache's build runs the tower."""
