"""Fixtures shared by the tests: real Ray, MLflow and S3 servers, and the GPU search path on the CPU."""

from __future__ import annotations

import os

import pytest
from server_process import stop, wait_until_up

# Fake AWS credentials for the whole session, set before any Ray worker starts (workers inherit
# the environment of ray.init): S3 tests talk to the local moto server only, and no test can
# reach a real account. The values are distinctive so tests can search for leaks of them.
os.environ.update(
    AWS_ACCESS_KEY_ID="AKIADMLPIPELINETEST0",
    AWS_SECRET_ACCESS_KEY="dml-fake-secret-0d2f9c41e7b8a6350f1e",
    AWS_DEFAULT_REGION="us-east-1",
)
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that trains on Ray (4 logical CPUs on 2 cores:
    workers, decode actors and the refresh actor take fractions)."""
    import ray

    ray.init(num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Make reaching for Ray (`ray.init`, `ray.is_initialized`) fail the test.

    "Rejected before any cluster resource is taken" is then checked whatever ran earlier: the
    session's `ray_local` stays up once a Ray test has run, so `ray.is_initialized()` after the
    call cannot tell whether the code under test started Ray or found it running.
    """
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the code reached for Ray before rejecting its input")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", refuse)


@pytest.fixture
def metric_history():
    """`metric_history(client, run_id, name)`: a metric's MLflow history in step order."""

    def history(client, run_id, name):
        return sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))

    return history


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback (sqlite store, served artifacts); its URI.

    One per test session: starting it costs ~10 s. Tests use their own experiment names.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    uri = f"http://127.0.0.1:{port}"
    # A loaded 2-core machine has taken over 120 s.
    wait_until_up(server, f"{uri}/health", root / "server.log", "mlflow server", 300)
    yield uri
    stop(server)
    log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto, over HTTP on loopback); its endpoint URL.

    The endpoint is not exported to the environment: each test passes it the way it tests
    (the `storage` config section, AWS_ENDPOINT_URL, or explicitly).
    """
    import subprocess
    import sys
    from pathlib import Path

    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    port = _free_port()
    log = open(log_path, "wb")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_until_up(server, f"{endpoint}/moto-api/", log_path, "moto_server", 60)
    yield endpoint
    stop(server)
    log.close()


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the `s3_server` (a unique name per test); its name."""
    import uuid

    import boto3

    name = f"dml-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def restored_environ():
    """Put os.environ back as it was after the test (for code that exports settings into it,
    such as `pipeline.storage.export_settings`, which the driver calls)."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def torch_search_on_cpu(monkeypatch):
    """Every search asked for on the GPU takes pipeline.exact_search's torch backend, on the
    CPU: the path a CUDA machine without faiss-gpu runs, checkable on a machine without a GPU."""
    import torch

    from pipeline import exact_search
    from pipeline.evaluation import metrics

    for module in (exact_search, metrics):
        monkeypatch.setattr(module, "gpu_backend", lambda k: "torch")
    monkeypatch.setattr(exact_search, "torch_device", lambda: torch.device("cpu"))
