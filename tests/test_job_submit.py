"""The training job on a real multi-process Ray cluster, submitted with the `ray job submit` CLI,
through two faults: the job stopped with `ray job stop` and submitted again (the run resumes
from its last checkpoint), then a training worker killed (the worker group restarts from the
last checkpoint within the job). MLflow ends with one run holding every step once.

The cluster is this test's own: a `ray start --head --block` process and a second node, with
their own ports, temp dirs and token, stopped by process group at the end (never `ray stop`,
which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.training.checkpoint import latest_checkpoint, registered_checkpoint

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STEPS_PER_EPOCH = 4
EPOCHS = 4
LOG_EVERY = 2
TINY = [
    "data.synthetic.num_classes=24",
    "data.synthetic.images_per_class=12",
    "data.synthetic.image_size=32",
    "data.image_size=24",
    "data.eval_resize=28",
    "sampler.classes_per_batch=4",
    "sampler.samples_per_class=3",
    f"train.epochs={EPOCHS}",
    f"train.steps_per_epoch={STEPS_PER_EPOCH}",
    f"train.log_every_steps={LOG_EVERY}",
    "eval.batch_size=64",
    "eval.nmi=false",
]


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (all held open at once while choosing)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class LocalRayCluster:
    """Two Ray nodes as separate processes on this machine, with token auth."""

    def __init__(self, root: Path):
        self.root = root
        self.token = secrets.token_hex(32)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # `python` in a job's entry point is the one with this project's dependencies,
            # as it is in the cluster image.
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            # On a busy 2-core machine a node's agents can take minutes to start: more
            # patience where Ray reads these (a raylet that still gives up is started again).
            "RAY_agent_register_timeout_ms": "300000",
            "RAY_raylet_start_wait_time_s": "300",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _start_node(self, name: str, args, ready, attempts: int = 3, wrap=lambda command: command) -> None:
        """`ray start --block` with `args(ports)` until `ready()`. Under load a raylet can give up
        waiting for its agents and exit; such an attempt is cleaned up and made again. `wrap`
        turns the command into the one started (another node's view of the files)."""
        for attempt in range(1, attempts + 1):
            ports = _free_ports(9)
            log = self.root / f"{name}-{attempt}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    wrap([str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                     f"--temp-dir={self.root / f'{name}-{attempt}'}", "--disable-usage-stats",
                     f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                     f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                     f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
                     "--object-store-memory=300000000", *args(ports[6:])]),
                    stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                )
            self.processes.append(process)
            deadline = time.monotonic() + 240
            while process.poll() is None and time.monotonic() < deadline and not ready():
                time.sleep(1)
            if process.poll() is None and ready():
                return
            self._stop_process(process)
            self.processes.remove(process)
        raise RuntimeError(f"{name} did not start in {attempts} attempts:\n{self.log_tail()}")

    def start(self, wrap_second=lambda command: command) -> None:
        """Start the head (2 CPUs, dashboard) and a second node (2 CPUs, its command through
        `wrap_second`); wait until both are up."""

        def head(ports):
            self.gcs_address = f"127.0.0.1:{ports[0]}"
            self.dashboard = f"http://127.0.0.1:{ports[1]}"
            return ["--head", f"--port={ports[0]}", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}",
                    f"--ray-client-server-port={ports[2]}"]

        self._start_node("head", head, lambda: self.alive_nodes() >= 1)
        self._start_node("node", lambda _: [f"--address={self.gcs_address}", "--num-cpus=2"],
                         lambda: self.alive_nodes() == 2, wrap=wrap_second)

    def api(self, path: str, method: str = "GET"):
        """JSON from the dashboard's HTTP API, with the cluster's token."""
        request = urllib.request.Request(
            self.dashboard + path, method=method, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read() or b"null")

    def alive_nodes(self) -> int:
        try:
            nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except OSError:
            return 0
        return sum(node["state"] == "ALIVE" for node in nodes)

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def alive_actors(self, class_name: str) -> list[dict]:
        actors = self.api("/api/v0/actors?limit=1000")["data"]["result"]["result"]
        return [a for a in actors if a["class_name"] == class_name and a["state"] == "ALIVE"]

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def cli(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job <command> ...` against this cluster."""
        return subprocess.run(
            [str(VENV_BIN / "ray"), "job", command, "--address", self.dashboard, *args],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )

    def log_tail(self) -> str:
        """The end of each node's `ray start` output and raylet log."""
        logs = self.logs + sorted(self.root.glob("*/session_latest/logs/raylet*.out"))
        return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())

    def stop(self) -> None:
        """Stop every node: SIGTERM to all first, so that they drain at the same time."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            self._stop_process(process)

    @staticmethod
    def _stop_process(process: subprocess.Popen) -> None:
        """SIGTERM to `ray start --block` (it stops its node's processes), then SIGKILL to what
        is left of its process group. Nothing outside this cluster is touched."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def cluster():
    # A short path: Ray's unix sockets live under the temp dir (108-character limit).
    root = Path(tempfile.mkdtemp(prefix="dmljob-", dir="/tmp"))
    cluster = LocalRayCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(condition, what: str, cluster: LocalRayCluster, job: str, timeout: float = 600):
    """Poll `condition` until it returns something true; fail early if the job ended."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        status = cluster.job_status(job)
        if status in ("FAILED", "STOPPED", "SUCCEEDED") or time.monotonic() > deadline:
            # The job may have ended just after `condition` was asked (and the condition may be
            # that it succeeded, or something it wrote on its way out): ask once more.
            value = condition()
            if value:
                return value
            raise AssertionError(f"waiting for {what}: job {job} is {status}\n{cluster.job_logs(job)[-5000:]}")
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.timeout(1800)
# Ray 2.60 reads its checkpoint record with a deprecated pydantic call (polled here).
@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # a generous bound for a loaded 2-core machine; ~4 minutes when idle
def test_submitted_training_survives_a_stopped_driver_and_a_dead_worker(cluster, tmp_path, metric_history):
    from mlflow import MlflowClient

    from pipeline.training.driver import run_name_for

    storage = tmp_path / "runs"
    overrides = TINY + [f"data.cache_dir={tmp_path / 'data'}", f"train.storage_path={storage}"]
    config = load_config("local", overrides)
    run_name = run_name_for(config)
    total = STEPS_PER_EPOCH * EPOCHS
    pids = storage / "worker-pids"
    entry = ["--", "python", "-m", "jobs.train", "--preset", "local",
             *[arg for item in overrides for arg in ("--set", item)]]

    def checkpoint_step() -> int:
        """The step of the latest checkpoint Ray Train registered (what a rerun resumes from)."""
        found = registered_checkpoint(str(storage), run_name)
        return 0 if found is None else found[2]

    def submit(job: str) -> None:
        # Each rank writes its pid under pids/<job>/ (PIPELINE_WORKER_PID_DIR, read by the loop).
        runtime_env = json.dumps({"env_vars": {"PIPELINE_WORKER_PID_DIR": str(pids / job)}})
        done = cluster.cli("submit", "--no-wait", "--submission-id", job, "--working-dir", ".",
                           "--runtime-env-json", runtime_env, *entry)
        assert done.returncode == 0, done.stdout + done.stderr

    # 1. Submit (the working dir is this tree, minus what .gitignore and .rayignore leave out).
    #    Once the run has a checkpoint, freeze both training processes (SIGSTOP: the CLI below
    #    takes seconds to start, and this run would end meanwhile) and stop the job.
    submit("train-1")
    frozen_at = _wait_for(checkpoint_step, "the first checkpoint", cluster, "train-1")
    ranks = [int((pids / "train-1" / f"rank-{rank}.pid").read_text()) for rank in (0, 1)]
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    stopped = cluster.cli("stop", "train-1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert cluster.job_status("train-1") == "STOPPED"
    for pid in ranks:  # let them take the signals Ray sends now that their driver is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 120
    while cluster.alive_actors("RayTrainWorker") and time.monotonic() < deadline:
        time.sleep(1)
    assert not cluster.alive_actors("RayTrainWorker"), "the workers died with their driver"
    stopped_at = checkpoint_step()
    assert stopped_at == frozen_at < total

    # 2. Submit the same command again: the run resumes from its checkpoint. Once it has made
    #    a checkpoint of its own, kill rank 1: the worker group restarts from that checkpoint.
    submit("train-2")
    killed_at = _wait_for(lambda: checkpoint_step() > stopped_at and checkpoint_step(),
                          "a checkpoint of the resumed run", cluster, "train-2")
    pid_file = pids / "train-2" / "rank-1.pid"
    first_pid = int(pid_file.read_text())
    os.kill(first_pid, signal.SIGKILL)
    _wait_for(lambda: cluster.job_status("train-2") == "SUCCEEDED", "the end of the run", cluster,
              "train-2")
    assert checkpoint_step() == total
    assert int(pid_file.read_text()) != first_pid, "rank 1 was restarted"
    logs = cluster.job_logs("train-2")
    resumes = [int(part.split()[0]) for part in logs.split("resumed from step ")[1:]]
    assert resumes[0] == stopped_at, logs[-5000:]
    assert len(resumes) == 2 and killed_at <= resumes[1] < total, logs[-5000:]

    # 3. One MLflow run holds the whole run, every step once.
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id],
        filter_string=f"tags.`pipeline.run_name` = '{run_name}'",
    )
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    loss_steps = [m.step for m in metric_history(client, run_id, "train/loss")]
    assert loss_steps == list(range(LOG_EVERY, total + 1, LOG_EVERY))
    recall_steps = [m.step for m in metric_history(client, run_id, "test/recall_at_1")]
    assert recall_steps == list(range(STEPS_PER_EPOCH, total + 1, STEPS_PER_EPOCH))


def _flushed(logger) -> None:
    """Wait until a MetricsLogger has sent what it holds (when it sends in the background)."""
    close = getattr(logger, "close", None)
    if close is not None:
        close()


def test_a_resumed_attempt_logs_no_step_twice(tmp_path, metric_history):
    """What the end-to-end test relies on, without Ray: steps an interrupted attempt logged
    after its last checkpoint are not logged again by the attempt that resumes."""
    from mlflow import MlflowClient

    from pipeline.tracking import MetricsLogger
    from pipeline.training.loop import _NewStepsOnly

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id
    interrupted = MetricsLogger(uri, run_id)
    for step in (2, 4, 6):  # checkpoint at 4, then 6 was logged before the attempt died
        interrupted.log({"train/loss": 1.0 / step}, step)
    interrupted.log({"test/recall@1": 0.5}, 4)
    _flushed(interrupted)

    resumed = _NewStepsOnly(MetricsLogger(uri, run_id))  # trains 5, 6, 7, 8 again
    resumed.log({"train/loss": 9.0}, 6)
    resumed.log({"train/loss": 0.125}, 8)
    resumed.log({"test/recall@1": 0.75}, 8)
    _flushed(resumed)
    assert [(m.step, m.value) for m in metric_history(client, run_id, "train/loss")] == [
        (2, 0.5), (4, 0.25), (6, 1.0 / 6), (8, 0.125)]
    assert [m.step for m in metric_history(client, run_id, "test/recall_at_1")] == [4, 8]


def test_a_checkpoint_written_but_never_registered_is_not_resumed_from(tmp_path):
    """A driver stopped between a checkpoint's upload and its report leaves a complete-looking
    directory that Ray Train never recorded and does not resume from: the driver must not
    plan the data from it either (it would refuse to train: the steps would not match)."""
    from pipeline.training.checkpoint import METRICS_FILE

    checkpoint = tmp_path / "run-1" / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / METRICS_FILE).write_text(json.dumps({"step": 4, "epoch": 1}))
    assert latest_checkpoint(str(tmp_path), "run-1")[2] == 4
    assert registered_checkpoint(str(tmp_path), "run-1") is None
    assert registered_checkpoint(str(tmp_path), "never-ran") is None
