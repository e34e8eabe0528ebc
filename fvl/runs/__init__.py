"""Run folders and where a run's records go: ``folder`` (the run folder's layout, ``RunDir``, and where
weights come from: a file, a run, ``latest``, ``mlflow:RUN_ID``), ``tracking`` (the MLflow store's settings
and the calls every part of fvl shares)."""
