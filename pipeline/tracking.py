"""MLflow: one run per training run, created by the driver and written to by rank 0.

By default the store is a sqlite database in the run storage directory with artifacts beside
it (`<storage>/mlflow.db`, `<storage>/mlartifacts`); `tracking.tracking_uri` overrides it. With
`s3://` storage the artifacts go to `<storage>/mlartifacts` in S3 while the database stays on
this machine (sqlite cannot live in an object store; see `local_store_dir`). A rerun of the same
run name (a resumed run) continues the same MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

RUN_NAME_TAG = "pipeline.run_name"
PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag that nests a run under another (a sweep trial under its sweep)."""


def local_store_dir(config) -> Path:
    """Directory of the default local MLflow store's database. For `s3://bucket/prefix` storage
    it is `runs/s3/bucket/prefix` under the working directory: one store per storage location,
    so its experiments keep their artifacts in that location."""
    storage = config.train.storage_path
    if "://" in storage:
        scheme, rest = storage.split("://", 1)
        return Path("runs", scheme, *rest.strip("/").split("/")).resolve()
    return Path(storage).resolve()


def tracking_uri(config) -> str:
    """The tracking URI the run uses."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    return f"sqlite:///{local_store_dir(config) / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri} in a browser"


def git_commit() -> str:
    """The source tree's commit (with '-dirty' if it has uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PIPELINE_GIT_COMMIT", "unknown")


def _experiment_id(client, config) -> str:
    name = config.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if not config.tracking.tracking_uri and "://" in config.train.storage_path:
        location = config.train.storage_path.rstrip("/") + "/mlartifacts"
    elif not config.tracking.tracking_uri:
        artifacts = local_store_dir(config) / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    return client.create_experiment(name, artifact_location=location)


def experiment_id(client, config) -> str:
    """The id of the config's MLflow experiment, created (with its artifact location) if new."""
    return _experiment_id(client, config)


def start_run(config, run_name: str, config_yaml: str, tags: dict[str, str]) -> str:
    """Create (or reopen, for a resumed run) the MLflow run; log params, config and tags."""
    from mlflow import MlflowClient

    from pipeline.config import flatten

    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, config)
    previous = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if previous:
        run_id = previous[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
        run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            client.log_batch(run_id, params=params[i : i + 100])
        client.log_text(run_id, config_yaml, "config.yaml")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id


class MetricsLogger:
    """Rank 0's writer: batches of metrics at a step, into the driver's run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` at `step` (names made MLflow-safe by `metric_name`)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()],
        )


def metric_name(key: str) -> str:
    """MLflow allows no '@' in names: `test/recall@1` is logged as `test/recall_at_1`."""
    return key.replace("@", "_at_")


def finish_run(uri: str, run_id: str, checkpoint_dir: str | None, failed: bool) -> None:
    """Attach the final checkpoint as artifacts and close the run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if checkpoint_dir:
        client.log_artifacts(run_id, checkpoint_dir, "model")
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
