"""`scripts/mlflow_server.sh`, the team tracking server, with the stores docs/tracking.md
promises: a real PostgreSQL server (Debian's, started here on loopback) for runs and metrics,
and S3 (the session's moto server) for artifacts, which clients upload through the server."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from server_process import stop, wait_until_up

REPO = Path(__file__).resolve().parent.parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_user() -> str | None:
    """The account PostgreSQL runs as: initdb refuses root, so root runs it as `postgres`."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return None


@pytest.fixture
def postgres():
    """A PostgreSQL server of its own (data dir and socket in a temp dir, 127.0.0.1 only) with
    an empty database `mlflow`; its URI."""
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (the dev extra)")
    user = _postgres_user()
    if user is None:
        pytest.skip("running as root and there is no 'postgres' account to run PostgreSQL as")
    # Not under pytest's tmp_path: that is private to root, and the server runs as `user`.
    root = Path(tempfile.mkdtemp(prefix="dmlpg-"))
    shutil.chown(root, user)
    as_user = [] if os.geteuid() != 0 else ["runuser", "-u", user, "--"]
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", "mlflow",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    port = _free_port()
    log = root / "server.log"
    server = subprocess.Popen(
        [*as_user, str(PG_BIN / "postgres"), "-D", str(root / "data"), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-k", str(root)],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115 - the server owns it
    )
    try:
        for _ in range(120):
            ready = subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            if server.poll() is not None:
                raise RuntimeError(f"postgres did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow",
                        "mlflow"], check=True, capture_output=True)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        stop(server)
        shutil.rmtree(root, ignore_errors=True)


def test_team_server_keeps_runs_in_postgres_and_artifacts_in_s3(postgres, s3_server, s3_bucket, tmp_path):
    import boto3
    import psycopg
    from mlflow import MlflowClient

    port = _free_port()
    log = tmp_path / "mlflow.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    destination = f"s3://{s3_bucket}/mlflow-artifacts"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "mlflow_server.sh"), "--port", str(port), "--workers", "1",
             "--backend-store-uri", postgres, "--artifacts-destination", destination,
             "--store-dir", str(tmp_path / "store")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        # A loaded 2-core machine has taken minutes to start mlflow server (tests/conftest.py).
        wait_until_up(server, f"{uri}/health", log, "scripts/mlflow_server.sh", 300)
        assert "bound to this machine only" in log.read_text()
        client = MlflowClient(uri)
        experiment = client.create_experiment(f"team-{uuid.uuid4().hex[:8]}")
        run = client.create_run(experiment, run_name="team-run")
        client.log_metric(run.info.run_id, "test/recall_at_1", 0.5, step=3)
        client.log_text(run.info.run_id, "hello from a job", "notes/hello.txt")
        client.set_terminated(run.info.run_id)

        # The run and its metric are rows in PostgreSQL...
        with psycopg.connect(postgres) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
            assert cursor.fetchall() == [("test/recall_at_1", 0.5, 3)]
        # ...the artifact, uploaded through the server (the client has no S3 endpoint), is an
        # object under the destination, and reads back through the server.
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
                .list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert [k for k in keys if k.endswith("notes/hello.txt")] == [
            f"mlflow-artifacts/{experiment}/{run.info.run_id}/artifacts/notes/hello.txt"]
        fetched = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
        assert Path(fetched).read_text() == "hello from a job"
        assert not (tmp_path / "store" / "mlflow.db").exists()  # the sqlite default was not used
    finally:
        stop(server)
        with contextlib.suppress(ProcessLookupError):  # what the server started, if it lives on
            os.killpg(server.pid, signal.SIGKILL)


def test_bad_options_are_refused_before_anything_starts(tmp_path):
    for args, message in ((["--port", "x"], "--port must be a number"),
                          (["--backend-store-uri", "runs.db"], "--backend-store-uri must be a URI"),
                          (["--colour"], "unknown option --colour")):
        result = subprocess.run(["bash", str(REPO / "scripts" / "mlflow_server.sh"), *args,
                                 "--store-dir", str(tmp_path / "store")], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
