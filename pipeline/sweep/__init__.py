"""Hyperparameter sweeps: a YAML search space, Ray Tune trials that each run a Ray Train run,
one MLflow parent run per sweep with a nested child run per trial.

`space.py` reads and checks the YAML, `search.py` turns it into Tune's search algorithm,
scheduler and concurrency, `trial.py` is the trial's driver function, `records.py` the MLflow
parent run and summary, `runner.py` ties them together (`run_sweep`).
"""
