"""The feature cache: a stage whose tower is frozen reads the tower's features from shards instead of running
it. ``store`` is the format (what the reader needs); ``build`` runs the tower to write it."""
