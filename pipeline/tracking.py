"""MLflow: one run per training run, created by the driver and written to by rank 0.

By default the store is a sqlite database in the run storage directory with artifacts beside
it (`<storage>/mlflow.db`, `<storage>/mlartifacts`); `tracking.tracking_uri` overrides it. With
`s3://` storage the artifacts go to `<storage>/mlartifacts` in S3 while the database stays on
this machine (sqlite cannot live in an object store; see `local_store_dir`). A rerun of the same
run name (a resumed run) continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

RUN_NAME_TAG = "pipeline.run_name"
MODEL_LOGGED_TAG = "pipeline.model_logged"
"""Set to "true" once a run's `model/` artifact is wholly uploaded: the upload goes file by file,
so a listing can show a model that an outage cut short. Only such a model is registered."""
PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag that nests a run under another (a sweep trial under its sweep)."""


def local_store_dir(config) -> Path:
    """Directory of the default local MLflow store's database. For `s3://bucket/prefix` storage
    it is `runs/s3/bucket/prefix` under the working directory: one store per storage location,
    so its experiments keep their artifacts in that location. A local path or `file://` URI
    holds its own store."""
    storage = config.train.storage_path
    if "://" in storage and urlsplit(storage).scheme != "file":
        scheme, rest = storage.split("://", 1)
        return Path("runs", scheme, *rest.strip("/").split("/")).resolve()
    # A local path, or file:// naming one: the store sits in the storage itself.
    return Path(urlsplit(storage).path if "://" in storage else storage).resolve()


def tracking_uri(config) -> str:
    """The tracking URI the run uses."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    return f"sqlite:///{local_store_dir(config) / 'mlflow.db'}"


def tracking_setting(config) -> str:
    """The setting that decides `tracking_uri(config)`, for messages: `tracking.tracking_uri`,
    or, when that is empty, `train.storage_path` (the local store goes under it)."""
    return "tracking.tracking_uri" if config.tracking.tracking_uri else "train.storage_path"


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
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:  # another job created it since we looked: use theirs
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiment_id(client, config) -> str:
    """The id of the config's MLflow experiment, created (with its artifact location) if new."""
    return _experiment_id(client, config)


class TrackingUnreachable(ValueError):
    """The tracking store named by a URI cannot be reached or opened."""


def _open_local_store(uri: str) -> None:
    """Create a local `sqlite:///` store (its folder, its tables) if it is new, holding a lock
    file beside it: MLflow's first-time setup migrates the schema, and two jobs that do it at
    once on one file fail, or leave a store no later job can open."""
    import fcntl

    from mlflow import MlflowClient

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as lock:  # noqa: PTH123 - a lock file, never read
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates it if new


def check_store(uri: str, setting: str = "tracking.tracking_uri") -> None:
    """Raise TrackingUnreachable, naming `setting`, when the store at `uri` does not answer a
    one-row query (with this module's few HTTP retries, seconds rather than MLflow's minutes).
    A local `sqlite:///` store is created here if new (`_open_local_store`)."""
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        try:
            _open_local_store(uri)
        except Exception as err:  # noqa: BLE001 - an unwritable folder, a broken database file
            raise TrackingUnreachable(f"{setting}: the local MLflow store {uri} does not open "
                                      f"({describe_error(err)})") from err
        return

    # Only for this probe: the calls after it (a sweep's parent run) keep MLflow's patience.
    unset = [key for key in _MLFLOW_HTTP_DEFAULTS if key not in os.environ]
    _limit_mlflow_http_retries()
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow, requests and SQLAlchemy each raise their own
        raise TrackingUnreachable(f"{setting}: the MLflow store at {uri} does not answer "
                                  f"({describe_error(err)})") from err
    finally:
        for key in unset:
            os.environ.pop(key, None)


def _named_run(client, experiment_id: str, run_name: str):
    """The MLflow run of the pipeline run `run_name` in the experiment, or None."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    return found[0] if found else None


_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class RecordedRun:
    """An MLflow run that a run of the same name would write into (`recorded_run`)."""

    run_id: str
    config_yaml: str | None
    """Its `config.yaml` artifact (None if it never arrived)."""
    dataset_fingerprint: str
    """Its `dataset.fingerprint` tag ("" if none)."""
    last_step: int
    """The highest step of any metric it holds (-1: none)."""


def recorded_run(config, run_name: str) -> RecordedRun | None:
    """The MLflow run `start_run` would reopen for `run_name`, or None: a run that reached
    MLflow before it stopped, with or without a checkpoint."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    run = None if experiment is None else _named_run(client, experiment.experiment_id, run_name)
    if run is None:
        return None
    shown = os.environ.get(_PROGRESS_BAR_ENV)
    os.environ[_PROGRESS_BAR_ENV] = "false"  # one small file: no progress bar on stderr
    try:
        with tempfile.TemporaryDirectory() as scratch:
            text = Path(client.download_artifacts(run.info.run_id, "config.yaml", scratch)).read_text()
    except Exception:  # noqa: BLE001 - an upload an outage cut short: nothing to compare
        text = None
    finally:
        if shown is None:
            os.environ.pop(_PROGRESS_BAR_ENV, None)
        else:
            os.environ[_PROGRESS_BAR_ENV] = shown
    last_step = max((m.step for key in run.data.metrics
                     for m in client.get_metric_history(run.info.run_id, key)), default=-1)
    return RecordedRun(run.info.run_id, text, run.data.tags.get("dataset.fingerprint", ""), last_step)


def start_run(config, run_name: str, config_yaml: str, tags: dict[str, str]) -> str:
    """Create (or reopen, for a resumed run) the MLflow run; log params, config and tags."""
    from mlflow import MlflowClient

    from pipeline.config import flatten

    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, config)
    previous = _named_run(client, experiment_id, run_name)
    if previous is not None:
        run_id = previous.info.run_id
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


UNLOGGED_FILE = "unlogged_metrics.json"
"""Written into the final checkpoint: the metrics rank 0 could not send (the driver resends)."""

# MLflow retries a failed HTTP call 7 times with backoff (minutes per call) and waits 120 s
# for a reply. The pipeline retries on its own, in the background, so processes that log turn
# those down unless the user has set them.
_MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def describe_error(err: BaseException) -> str:
    """A one-line account of a tracking failure: the OS error behind MLflow's wrapped HTTP
    errors when there is one (`[Errno 111] Connection refused`), else the first line."""
    text = str(err)
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if cause:
        return f"{type(err).__name__} ({cause.group(0).strip()})"
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _limit_mlflow_http_retries() -> None:
    for key, value in _MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass
class UnloggedMetrics:
    """Metrics that never reached the tracking server: `held` can still be sent (MLflow
    `Metric`s, timestamps kept, so a resend never duplicates), `dropped` were discarded when
    the buffer was full (key -> [count, first step, last step])."""

    held: list = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    error: str = ""
    """The last error the tracking server gave."""

    def __bool__(self) -> bool:
        return bool(self.held or self.dropped)

    def describe(self) -> list[str]:
        """One line per metric name: how many values, at which steps, and whether resendable."""
        steps: dict[str, list[int]] = {}
        for metric in self.held:
            steps.setdefault(metric.key, []).append(metric.step)
        lines = [
            f"metric {key}: {len(s)} values at steps {_step_span(s)} (held)"
            for key, s in sorted(steps.items())
        ]
        lines += [
            f"metric {key}: {count} values at steps {first}..{last} (dropped: the buffer was full)"
            for key, (count, first, last) in sorted(self.dropped.items())
        ]
        return lines

    def to_json(self) -> str:
        """JSON text (saved in the final checkpoint as `UNLOGGED_FILE`)."""
        held = [[m.key, m.value, m.timestamp, m.step] for m in self.held]
        return json.dumps({"held": held, "dropped": self.dropped, "error": self.error})

    @classmethod
    def from_json(cls, text: str) -> UnloggedMetrics:
        """Inverse of `to_json`."""
        from mlflow.entities import Metric

        doc = json.loads(text)
        held = [Metric(key, value, timestamp, step) for key, value, timestamp, step in doc["held"]]
        return cls(held, doc["dropped"], doc["error"])


def _step_span(steps: list[int]) -> str:
    steps = sorted(set(steps))
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}..{steps[-1]}"


def save_unlogged(directory: str, unlogged: UnloggedMetrics) -> None:
    """Write `unlogged` into a checkpoint directory (nothing when everything was sent)."""
    if unlogged:
        (Path(directory) / UNLOGGED_FILE).write_text(unlogged.to_json())


def load_unlogged(directory: str) -> UnloggedMetrics:
    """What `save_unlogged` wrote into a checkpoint directory (empty if nothing)."""
    path = Path(directory) / UNLOGGED_FILE
    return UnloggedMetrics.from_json(path.read_text()) if path.exists() else UnloggedMetrics()


class MetricsLogger:
    """Rank 0's writer: batches of metrics at a step, into the driver's run.

    `log` never blocks on the tracking server and never fails: a background thread sends the
    queued metrics. While the server cannot be reached it keeps them (at most `max_buffered`;
    later ones are dropped and counted) and retries with exponential backoff, from
    `first_backoff_s` doubling up to `max_backoff_s`. `close` sends what it can before a
    deadline and returns what was not sent.
    """

    def __init__(self, uri: str, run_id: str, *, max_buffered: int = 200_000,
                 first_backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        from mlflow import MlflowClient

        _limit_mlflow_http_retries()
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.max_buffered = max_buffered
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.failures = 0
        """Failed sends in a row (0 while the server answers)."""
        self.last_error = ""
        self._pending: deque = deque()
        self._dropped: dict[str, list[int]] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._stop = False
        self._retry_now = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` (names made MLflow-safe by `metric_name`)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.resend([Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()])

    def resend(self, metrics: list) -> None:
        """Queue MLflow `Metric`s as they are (e.g. `UnloggedMetrics.held` of another logger)."""
        with self._cond:
            if self._closing:
                raise RuntimeError("MetricsLogger is closed")
            room = max(0, self.max_buffered - len(self._pending))
            self._pending.extend(metrics[:room])
            for metric in metrics[room:]:
                count, first, last = self._dropped.get(metric.key, [0, metric.step, metric.step])
                first, last = min(first, metric.step), max(last, metric.step)
                self._dropped[metric.key] = [count + 1, first, last]
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Metrics queued and not yet acknowledged by the server."""
        with self._cond:
            return len(self._pending)

    def held(self) -> UnloggedMetrics:
        """A copy of what is not sent yet (the logger goes on). Rank 0 saves it with every
        checkpoint: a worker group restarted after this process died sends it (`carry_over`)."""
        with self._cond:
            dropped = {key: list(span) for key, span in self._dropped.items()}
            return UnloggedMetrics(list(self._pending), dropped, self.last_error)

    def carry_over(self, unlogged: UnloggedMetrics) -> None:
        """Take on what an earlier logger did not send (a dead attempt's, from the checkpoint
        this one resumes): its held metrics are queued again, its dropped ones counted as ours."""
        self.resend(unlogged.held)
        with self._cond:
            for key, (count, first, last) in unlogged.dropped.items():
                mine = self._dropped.get(key, [0, first, last])
                self._dropped[key] = [mine[0] + count, min(mine[1], first), max(mine[2], last)]

    def close(self, timeout_s: float = 30.0) -> UnloggedMetrics:
        """Send what is queued (retrying at once, then with backoff) for at most `timeout_s`;
        returns what was not sent. The logger takes no more metrics afterwards."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = self._retry_now = True
            self._cond.notify_all()
            left = max(0.0, deadline - time.monotonic())
            self._cond.wait_for(lambda: not self._pending, timeout=left)
            self._stop = True
            self._cond.notify_all()
        # A send still in flight may land after this; a resend of the same Metric is harmless.
        self._thread.join(timeout=1.0)
        with self._cond:
            return UnloggedMetrics(list(self._pending), dict(self._dropped), self.last_error)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop)
                if self._stop:
                    return
                size = min(len(self._pending), _MAX_METRICS_PER_BATCH)
                batch = [self._pending[i] for i in range(size)]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # noqa: BLE001 - any failure: keep the metrics, retry later
                with self._cond:
                    self.failures += 1
                    self.last_error = describe_error(err)
                    delay = min(self.first_backoff_s * 2 ** (self.failures - 1), self.max_backoff_s)
                    self._cond.wait_for(lambda: self._stop or self._retry_now, timeout=delay)
                    self._retry_now = False
                continue
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                self.failures = 0
                self._cond.notify_all()


def metric_name(key: str) -> str:
    """MLflow allows no '@' in names: `test/recall@1` is logged as `test/recall_at_1`."""
    return key.replace("@", "_at_")


def finish_run(uri: str, run_id: str, checkpoint_dir: str | None, failed: bool, *,
               artifacts: dict[str, str] | None = None, retry_s: float = 60.0,
               killed: bool = False) -> list[str]:
    """Attach the final checkpoint (`model/`, then `MODEL_LOGGED_TAG`) and the folders in
    `artifacts` (MLflow path -> local folder), then close the run (FAILED, KILLED when it was
    stopped, or FINISHED). Each step is retried with backoff while `retry_s` lasts; returns one
    line per thing that could not be recorded (empty when all was)."""
    from mlflow import MlflowClient

    _limit_mlflow_http_retries()
    client = MlflowClient(uri)
    folders = {"model": checkpoint_dir} if checkpoint_dir else {}
    folders.update(artifacts or {})
    status = "KILLED" if killed else "FAILED" if failed else "FINISHED"

    def log_folder(path, local):
        client.log_artifacts(run_id, local, path)
        if path == "model":
            client.set_tag(run_id, MODEL_LOGGED_TAG, "true")

    steps = [
        (f"artifacts {path}/ (from {local})", lambda p=path, d=local: log_folder(p, d))
        for path, local in folders.items()
    ]
    steps.append((f"run status {status} (the run still shows RUNNING)",
                  lambda: client.set_terminated(run_id, status=status)))
    deadline = time.monotonic() + retry_s
    not_recorded = []
    for what, step in steps:
        error = _retried(step, deadline)
        if error:
            not_recorded.append(f"{what}: {error}")
    return not_recorded


def print_not_recorded(lines: list[str], uri: str, run_id: str, printer=print, what: str = "everything") -> None:
    """Print what MLflow did not get (`finish_run`'s and `UnloggedMetrics.describe`'s lines)
    under one heading; nothing when it got all."""
    if lines:
        printer(f"MLflow ({uri}) did not get {what} for run {run_id}:", flush=True)
        for line in lines:
            printer(f"  {line}", flush=True)


def _retried(step, deadline: float) -> str:
    """Run `step` until it succeeds or `deadline` passes (at least once); '' or its last error."""
    delay = 1.0
    while True:
        try:
            step()
            return ""
        except Exception as err:  # noqa: BLE001 - any failure is retried, then reported
            error = describe_error(err)
        left = deadline - time.monotonic()
        if left <= 0:
            return error
        time.sleep(min(delay, left))
        delay = min(delay * 2, 30.0)
