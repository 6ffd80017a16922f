"""One real distributed run (2 workers) with everything on S3 (a real moto server over HTTP):
the dataset, the pretrained weights, Ray Train's checkpoints and the MLflow artifacts; read back
with boto3, and no credential anywhere in MLflow or the output."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from short_runs import SHORT_RUN

from pipeline import storage
from pipeline.config import load_config
from pipeline.config.settings import ModelConfig
from pipeline.data.synthetic import SyntheticSpec, generate_synthetic
from pipeline.models import build_model
from pipeline.training.checkpoint import MODEL_FILE, latest_checkpoint

pytestmark = pytest.mark.ray

TINY = SHORT_RUN
SPEC = SyntheticSpec(num_classes=24, images_per_class=12, image_size=32)


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` (directory markers left out) and its bytes."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def _convert_folder_tree(tree, destination: str):
    """A tiny class-folder tree converted by `jobs.prepare_data`'s converter (its Ray tasks
    encode, the driver writes to `destination`); the written dataset's metadata, checked."""
    from PIL import Image

    from pipeline.data.convert import ConversionOptions, EncodeOptions, convert_dataset
    from pipeline.data.format import validate_dataset

    for label in range(4):
        (tree / f"class_{label}").mkdir(parents=True)
        for index in range(2):
            colour = (60 * label, 120 * index, 200)
            Image.new("RGB", (20, 16), colour).save(tree / f"class_{label}" / f"{index}.png")
    options = ConversionOptions(encode=EncodeOptions(short_side=0), cpus_per_task=0.25)
    convert_dataset("folders", str(tree), destination, options, printer=lambda *a, **k: None)
    return validate_dataset(destination, check_images=True, check_fingerprint=True)


def test_a_run_reads_and_writes_everything_on_s3(
    ray_local, s3_server, s3_bucket, restored_environ, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from pipeline.training.driver import run_training

    monkeypatch.chdir(tmp_path)  # the local MLflow database of s3:// storage lives in ./runs
    base = f"s3://{s3_bucket}"
    # Before the run: the dataset and the pretrained backbone go to S3 (endpoint from the
    # standard variable); the run itself gets the endpoint only from its config.
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3_server)
        generate_synthetic(f"{base}/data", SPEC)
        converted = _convert_folder_tree(tmp_path / "folders", f"{base}/folders")
        torch.manual_seed(7)
        weights = io.BytesIO()
        torch.save(build_model(ModelConfig(backbone="tiny_cnn")).backbone.state_dict(), weights)
        storage.s3_client().put_object(Bucket=s3_bucket, Key="weights/tiny.pt", Body=weights.getvalue())
    assert not storage.s3_endpoint_url()

    config = load_config(
        "local",
        TINY + [
            f"data.root={base}/data",
            f"model.pretrained={base}/weights/tiny.pt",  # read by every Ray Train worker
            f"train.storage_path={base}/runs",
            f"storage.s3_endpoint_url={s3_server}",
        ],
    )
    lines: list[str] = []
    summary = run_training(config, printer=lambda text, **_: lines.append(text))
    assert any("step      8/8" in line for line in lines), lines
    client = storage.s3_client()

    # The dataset the run read: metadata and every shard it lists.
    data = _objects(client, s3_bucket, "data/")
    meta = json.loads(data["data/metadata.json"])
    assert {f"data/{shard}" for split in meta["splits"].values() for shard in split["shards"]} == (
        set(data) - {"data/metadata.json"}
    )

    # The converted folder tree: its shards, metadata and conversion summary.
    folders = _objects(client, s3_bucket, "folders/")
    assert converted.num_images() == 8 and converted.class_names == tuple(f"class_{i}" for i in range(4))
    shards = {f"folders/{s}" for split in converted.splits for s in converted.split(split).shards}
    assert set(folders) == shards | {"folders/metadata.json", "folders/conversion_summary.json"}

    # Ray Train's checkpoints went to S3; the resume lookup finds the final one there.
    run_prefix = f"runs/{summary.run_name}/"
    assert summary.checkpoint_path.startswith(f"{base}/{run_prefix}checkpoint_")
    final = summary.checkpoint_path.removeprefix(f"{base}/") + "/"
    checkpoints = _objects(client, s3_bucket, run_prefix)
    assert {"model.pt", "state.pt", "config.yaml", "metrics.json"} <= {
        key.removeprefix(final) for key in checkpoints if key.startswith(final)
    }
    assert json.loads(checkpoints[final + "metrics.json"])["step"] == 8
    _, directory, step = latest_checkpoint(f"{base}/runs", summary.run_name)
    assert (f"s3://{directory}", step) == (summary.checkpoint_path, 8)
    # evaluate/export read Ray Train's record of the run, in S3 too.
    from pipeline.serving.checkpoints import locate_checkpoint

    assert locate_checkpoint(summary.run_name, f"{base}/runs")[1] == directory
    # `jobs.evaluate` of the run by name, the endpoint given only by its `--set` (the run left it
    # in this process's environment: taken out first, and left out after).
    from pipeline.serving.evaluation import evaluate_checkpoint

    for name in storage.WORKER_ENV:
        os.environ.pop(name, None)
    evaluated = evaluate_checkpoint(
        summary.run_name,
        [f"train.storage_path={base}/runs", f"storage.s3_endpoint_url={s3_server}", "storage.s3_max_attempts=2"],
        printer=lambda *a, **k: None,
    )
    assert 0 <= evaluated.metrics["test/recall@1"] <= 1
    assert not storage.s3_endpoint_url()

    # MLflow: the database stays on this machine, the artifacts are in S3.
    assert summary.tracking_uri == f"sqlite:///{tmp_path}/runs/s3/{s3_bucket}/runs/mlflow.db"
    mlflow = MlflowClient(summary.tracking_uri)
    run = mlflow.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(f"{base}/runs/mlartifacts/")
    artifacts = _objects(client, s3_bucket, run.info.artifact_uri.removeprefix(f"{base}/") + "/")
    names = {key.rsplit("/artifacts/", 1)[1] for key in artifacts}
    assert {"config.yaml", "model/model.pt", "model/state.pt", "model/config.yaml"} <= names
    logged = next(v for k, v in artifacts.items() if k.endswith(f"/artifacts/model/{MODEL_FILE}"))
    assert logged == checkpoints[final + MODEL_FILE]
    state = torch.load(io.BytesIO(logged), map_location="cpu", weights_only=True)
    assert state.keys() == build_model(ModelConfig(backbone="tiny_cnn")).state_dict().keys()
    assert run.data.params["storage.s3_endpoint_url"] == s3_server  # the endpoint is no secret

    # No credential in MLflow's params, tags or artifacts, the checkpoints or the output.
    searched = {
        "params": json.dumps(run.data.params).encode(),
        "tags": json.dumps(run.data.tags).encode(),
        "output": "\n".join(lines).encode(),
        **artifacts,
        **checkpoints,
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        secret = os.environ[name].encode()
        leaks = [where for where, content in searched.items() if secret in content]
        assert not leaks, f"{name} appears in {leaks}"
