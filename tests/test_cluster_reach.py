"""On a cluster, the run's other nodes must see its local files and reach its servers: checked
from those nodes before the run is created (`pipeline.cluster_reach`).

The cluster is two `ray start` nodes on this machine (the job-submit test's), the second started
in a mount namespace of its own with an empty tmpfs over one folder: to it, what the driver
writes there is on another machine's disk, as without a shared filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_convert_layouts import build_folders
from test_job_submit import TINY, LocalRayCluster

from pipeline.cluster_reach import Need, run_needs, tracking_need, unmet
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


# ----------------------------------------------------------------------------- on this node


def test_a_run_needs_its_local_files_and_servers_on_every_node(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    weights = tmp_path / "w.pt"
    config = load_config("local", [f"train.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'data'}",
                                   f"model.pretrained={weights}"])
    needs = run_needs(config, str(tmp_path / "data" / "synthetic"), str(tmp_path / "runs" / "x.lock"))
    assert needs == [
        Need("train.storage_path", str(tmp_path / "runs"), "file", str(tmp_path / "runs" / "x.lock")),
        Need("data.cache_dir", str(tmp_path / "data"), "file", str(tmp_path / "data" / "synthetic" / "metadata.json")),
        Need("model.pretrained", str(weights), "file", str(weights)),
        Need("train.storage_path", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "file",
             str(tmp_path / "runs" / "mlflow.db")),
    ]
    # Everything on S3 and a tracking server: the servers, no files. The default local store of
    # S3 storage (runs/s3/... under the driver's working directory) would be a file.
    remote = load_config("local", ["train.storage_path=s3://b/runs", "data.root=s3://b/data",
                                   "tracking.tracking_uri=https://mlflow.internal"])
    assert run_needs(remote, "s3://b/data", None) == [
        Need("tracking.tracking_uri", "https://mlflow.internal", "server", "mlflow.internal:443"),
        Need("storage.s3_endpoint_url", "http://minio.internal:9000", "server", "minio.internal:9000"),
    ]
    # file:// storage holds its own store, as the same plain path does (it was under the
    # driver's working directory, which the other nodes do not have).
    as_uri = load_config("local", [f"train.storage_path=file://{tmp_path / 'runs'}"])
    store, = (need for need in run_needs(as_uri, "s3://b/data", None) if need.target.endswith("mlflow.db"))
    assert store.target == str(tmp_path / "runs" / "mlflow.db")
    assert tracking_need(f"sqlite:///{tmp_path}/m.db", "x").kind == "file"
    assert tracking_need("databricks", "x") is None


def test_what_a_node_lacks_is_named(tmp_path, monkeypatch):
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    there = tmp_path / "there"
    there.write_text("")
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refuses connections
        live, dead = (f"127.0.0.1:{s.getsockname()[1]}" for s in (listening, closed))
        problems = unmet([
            Need("data.root", "d", "file", str(there)),
            Need("model.pretrained", "p", "file", str(tmp_path / "missing")),
            Need("tracking.tracking_uri", f"http://{live}", "server", live),
            Need("tracking.tracking_uri", f"http://{dead}", "server", dead),
        ])
    assert problems == [
        f"model.pretrained: {tmp_path / 'missing'} is not on this node's disk",
        f"tracking.tracking_uri: http://{dead} does not answer from this node (Connection refused)",
    ]
    # Through a proxy (MLflow and boto use the environment's), a direct connection proves
    # nothing either way: not checked.
    monkeypatch.setenv("http_proxy", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "")
    assert unmet([Need("tracking.tracking_uri", f"http://{dead}", "server", dead)]) == []


# ----------------------------------------------------------------------------- on a cluster


@pytest.fixture(scope="module")
def cluster_without_shared_folder():
    """(cluster, folder): a two-node cluster whose second node sees an empty `folder`."""
    if not _can_unshare():
        pytest.skip("needs `unshare --mount` (a mount namespace: root or CAP_SYS_ADMIN)")
    root = Path(tempfile.mkdtemp(prefix="dmlreach-", dir="/tmp"))  # short: Ray's socket paths
    folder = root / "head_only"
    folder.mkdir()
    cluster = LocalRayCluster(root)

    def unshared(command: list[str]) -> list[str]:
        quoted = " ".join(f"'{part}'" for part in command)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs none '{folder}' && exec {quoted}"]

    try:
        cluster.start(wrap_second=unshared)
        yield cluster, folder
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_run_whose_files_the_other_node_lacks_is_refused_before_it_exists(cluster_without_shared_folder):
    cluster, folder = cluster_without_shared_folder
    runs, data = folder / "runs", folder / "data"
    args = ["--preset", "local", *[a for item in TINY + [f"train.storage_path={runs}", f"data.cache_dir={data}"]
                                   for a in ("--set", item)]]
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
    job = subprocess.run([sys.executable, "-m", "jobs.train", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 2, job.stdout + job.stderr
    error = job.stderr
    assert ("error: the run's processes on other nodes of the cluster would not find what they open:\n"
            "  node ") in error, error
    for line in (f"train.storage_path: {runs}/.run-locks/", f"data.cache_dir: {data}/",
                 f"train.storage_path: {runs}/mlflow.db is not on this node's disk"):
        assert line in error, error
    assert "put local paths on a filesystem every node mounts at the same path, or use s3://" in error
    # Refused before the run was created: the store the driver opened holds no run.
    with sqlite3.connect(runs / "mlflow.db") as store:
        assert store.execute("select count(*) from runs").fetchone() == (0,)

    # What both nodes see (and a server both reach) passes; what only the head sees does not.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        shared = Path(cluster.root) / "shared.txt"
        shared.write_text("")
        needs = [("data.root", str(shared), "file", str(shared)),
                 ("tracking.tracking_uri", "http://x", "server", f"127.0.0.1:{server.getsockname()[1]}")]
        hidden = [("model.pretrained", "w", "file", str(folder / "data"))]
        script = (
            "import json, sys, ray\n"
            "from pipeline.cluster_reach import Need, check_cluster_reach\n"
            "ray.init()\n"
            "for needs in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        check_cluster_reach([Need(*n) for n in needs]); print('ok')\n"
            "    except ValueError as err:\n"
            "        print('refused:', str(err).splitlines()[1].strip())\n"
        )
        checked = subprocess.run([sys.executable, "-c", script, json.dumps([needs, hidden])], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr
    ok, refused = checked.stdout.splitlines()[-2:]
    assert ok == "ok", checked.stdout
    assert refused.startswith("refused: node ") and refused.endswith(
        f"): model.pretrained: {folder / 'data'} is not on this node's disk"), checked.stdout
    assert os.path.exists(folder / "data")  # (on the head, it is)


def test_a_conversion_whose_source_the_other_node_lacks_is_refused_before_it_writes(
    cluster_without_shared_folder, tmp_path,
):  # fmt: skip
    """The encoding tasks read the source on every node; one without it would skip each image
    it was given as unreadable, and the dataset would silently lack them."""
    cluster, folder = cluster_without_shared_folder
    source = build_folders(folder / "src")
    destination = tmp_path / "out"
    job = subprocess.run([sys.executable, "-m", "jobs.prepare_data", "folders", str(source), str(destination)],
                         env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 2, job.stdout + job.stderr
    assert ("prepare_data: the conversion's encoding tasks on other nodes of the cluster would not find "
            "what they open:\n  node ") in job.stderr, job.stderr
    assert f": source: {source}/" in job.stderr and "is not on this node's disk" in job.stderr, job.stderr
    assert not destination.exists()
