"""cluster.yaml passes Ray's own cluster-config validation and says what docs/cluster.md
promises; the working directory a job uploads leaves out what it should (Ray's own packaging)."""

from __future__ import annotations

import copy
import shutil
import zipfile
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_accepts_the_cluster_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it launches anything: fill in the AWS defaults, then validate
    # against Ray's schema and its cross-field rules (head type, min vs max workers, docker).
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_the_head_trains_nothing_and_gpu_nodes_autoscale(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--head" in head_start

    gpu_types = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    families = {spec["node_config"]["InstanceType"].split(".")[0] for spec in gpu_types.values()}
    assert families == {"g5", "p4d", "p5"}
    for name, spec in gpu_types.items():
        assert spec["resources"]["GPU"] > 0, name
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= cluster["max_workers"], name
        # S3 through the instance's role, never keys in the config.
        assert spec["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert any(opt.startswith("--shm-size=") for opt in spec["docker"]["worker_run_options"]), (
            name
        )
    assert sum(spec["min_workers"] for spec in gpu_types.values()) == 0, "GPU nodes start on demand"


def test_nodes_run_the_pinned_ray_image_with_this_package_and_token_auth(cluster):
    docker = cluster["docker"]
    assert docker["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any(opt.startswith("--shm-size=") for opt in docker["head_run_options"])
    # The working tree is synced to every node and pip-installed there.
    assert cluster["file_mounts"]["/home/ray/dml-pipeline"] == "."
    assert any(
        "pip install" in cmd and "/home/ray/dml-pipeline" in cmd
        for cmd in cluster["setup_commands"]
    )
    assert ".gitignore" in cluster["rsync_filter"]
    # Every node starts Ray with token auth and finds the token copied from the laptop.
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token ray start" in " ".join(commands)
    assert cluster["file_mounts"]["/home/ray/.ray"] == "~/.ray"
    text = (REPO / "cluster.yaml").read_text()
    assert "ray get-auth-token --generate" in text and "CHANGE" in text


@pytest.mark.parametrize(
    "read_gitignore", [True, False], ids=["gitignore+rayignore", "rayignore-only"]
)
def test_the_uploaded_working_dir_leaves_out_environments_data_runs_and_git(
    tmp_path, read_gitignore
):
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "repo"
    kept = [
        "pipeline/__init__.py",
        "pipeline/presets/local.yaml",
        "jobs/train.py",
        "cluster.yaml",
        "pyproject.toml",
        "pipeline/data/format.py",
    ]
    left_out = [
        ".venv/lib/python3.11/site-packages/torch/lib.so",
        ".git/objects/ab/cdef",
        "data/synthetic-1/metadata.json",
        "runs/mlflow.db",
        "runs/run-1/checkpoint_0/model.pt",
        "mlartifacts/1/a.bin",
        "local.db",
        "pipeline/__pycache__/x.pyc",
        "benchmarks/out/figure.png",
    ]
    for name in kept + left_out:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    shutil.copy(REPO / ".rayignore", tree / ".rayignore")
    shutil.copy(REPO / ".gitignore", tree / ".gitignore")

    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=read_gitignore)
    with zipfile.ZipFile(package) as archive:
        names = {name for name in archive.namelist() if not name.endswith("/")}
    assert set(kept) <= names
    assert not names & set(left_out), sorted(names & set(left_out))
