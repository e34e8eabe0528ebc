"""Data: recipes, the synthetic generator, shard building, image preprocessing, the streaming DataModule."""
