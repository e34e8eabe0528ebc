"""Training: stage LightningModules, optimisation, checkpoints, MLflow tracking, runs and sweeps.
(Kept import-light: ``fvl.config`` imports the schema from ``fvl.config.train``.)"""
