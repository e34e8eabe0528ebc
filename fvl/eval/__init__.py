"""Evaluation and analysis: benchmark metrics, fvl eval, alignment loss, feature PCA."""
