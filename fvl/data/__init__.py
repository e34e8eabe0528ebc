"""Data: image preprocessing per tower (and, with the data issue, recipes, shards and the DataModule)."""
