"""What the dataset decides about a run is checked before Ray starts: a missing dataset or
split, a sampler the training split cannot fill, a refresh index it cannot train, missing
pretrained weights. The train job prints one line naming the setting or file and exits 2,
no run is created (no MLflow store, no checkpoint folder), and a sweep refuses the same way."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from short_runs import TINY_BUILT_IN

from jobs.sweep import main as sweep_main
from jobs.train import main as train_main
from pipeline.config import load_config
from pipeline.models import EmbeddingNet
from pipeline.training.driver import PreflightCache, RunRefused, preflight
from pipeline.training.resources import local_resources

# The tiny built-in dataset: 12 training classes x 12 images.
REFUSED = [
    ("local", ["data.root={tmp}/nowhere"], "{tmp}/nowhere/metadata.json: no such file (not a dataset root?)"),
    ("local", ["data.test_split=tset"], "data.test_split: {cache}"),
    ("local", ["sampler.classes_per_batch=20"],
     "sampler.classes_per_batch: 20 classes per batch but the training split has only 12 classes"),
    ("local", ["loss.name=normalized_softmax", "sampler.name=shuffle", "sampler.batch_size=500"],
     "sampler.batch_size: 500 exceeds the 144 training examples"),
    ("magnet", ["loss.magnet.clusters_per_neighbourhood=100"],
     "loss.magnet.clusters_per_neighbourhood: 100 clusters per neighbourhood need 99 impostor clusters"),
    ("pddm", ["refresh.pool_index=IVF4096,Flat"],
     "refresh.pool_index: 'IVF4096,Flat' trains on the training split's 144 pooled images but needs"),
    ("local", ["model.pretrained={tmp}/resnet.pth"], "model.pretrained: no file at {tmp}/resnet.pth"),
    # Weights of another network: found here, not in every worker after the run started.
    ("local", ["model.pretrained={tmp}/resnet18.pth"],
     "model.pretrained: {tmp}/resnet18.pth does not fit backbone (unexpected keys such as ['conv1.weight'"),
    # The built-in dataset cannot be generated where data.cache_dir says (a file, not a folder).
    ("local", ["data.cache_dir={tmp}/cache_file"], "data.cache_dir: "),
    # More than a local Ray has (0.5 CPU per worker here): Ray Train would wait for it forever.
    ("local", ["train.num_workers={too_many}"],
     "train.num_workers: the run needs {too_many_need:g} logical CPUs (workers, decode actors, a read "
     "task) but a local Ray has {cpus:g}"),
]


def _overrides(tmp_path, extra: list[str]) -> list[str]:
    settings = [*TINY_BUILT_IN, f"data.cache_dir={tmp_path}/data", f"train.storage_path={tmp_path}/runs"]
    return settings + [item.format(tmp=tmp_path) for item in extra]


def _too_many_workers() -> tuple[int, float]:
    """A worker count the local Ray cannot hold, and the CPUs it needs (the local preset:
    0.5 per worker, a decode actor and a read task)."""
    workers = int(local_resources()["CPU"] * 2) + 1
    return workers, workers * 0.5 + 0.75


@pytest.mark.parametrize(("preset", "extra", "message"), REFUSED)
def test_the_train_job_refuses_before_ray_and_writes_nothing(
    tmp_path, capsys, monkeypatch, ray_must_not_start, preset, extra, message,
):  # fmt: skip
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local run
    (tmp_path / "cache_file").write_text("not a folder")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    workers, need = _too_many_workers()
    args = ["--preset", preset]
    for item in _overrides(tmp_path, [e.replace("{too_many}", str(workers)) for e in extra]):
        args += ["--set", item]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    expected = message.format(tmp=tmp_path, cache=tmp_path / "data", cpus=local_resources()["CPU"],
                              too_many_need=need)
    assert expected in err
    assert not (tmp_path / "runs").exists()  # no MLflow store, no run, no checkpoint folder


def test_a_tracking_server_that_does_not_answer_is_refused_before_ray(
    tmp_path, capsys, monkeypatch, ray_must_not_start,
):  # fmt: skip
    """A mistyped or stopped server: seconds and one line, not minutes of retries and a
    traceback (nothing listens on port 1). The probe's short retries are its own: later
    calls of the process keep MLflow's."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    args = ["--preset", "local", "--set", "tracking.tracking_uri=http://127.0.0.1:1"]
    args += [a for item in _overrides(tmp_path, []) for a in ("--set", item)]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking.tracking_uri: the MLflow store at http://127.0.0.1:1 "
                          "does not answer (") and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    assert not [key for key in os.environ if key.startswith("MLFLOW_HTTP_REQUEST")]


def test_a_storage_path_that_is_a_file_is_named_as_the_setting_to_change(tmp_path, capsys, ray_must_not_start):
    """The local MLflow store goes under train.storage_path when tracking.tracking_uri is empty:
    the refusal names the setting the user gave, and the file is kept."""
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    args = ["--preset", "local", *[a for item in _overrides(tmp_path, []) for a in ("--set", item)]]
    assert train_main([*args, "--set", f"train.storage_path={a_file}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: train.storage_path: the local MLflow store sqlite:///{a_file}/mlflow.db does not open ("
    )
    assert a_file.read_text() == "kept"


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="this machine has the gpu preset's 4 GPUs")
def test_the_gpu_preset_is_refused_on_a_machine_without_its_gpus(tmp_path, capsys, monkeypatch, ray_must_not_start):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local run
    args = ["--preset", "gpu", *[a for item in _overrides(tmp_path, []) for a in ("--set", item)]]
    assert train_main(args) == 2
    assert capsys.readouterr().err == (
        "error: train.use_gpu: the run needs 4 GPUs (train.num_workers=4 x train.gpus_per_worker=1) "
        f"but this machine has {torch.cuda.device_count()}; set train.use_gpu=false or fewer workers, "
        "or set RAY_ADDRESS to run on a cluster\n"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("shares", "gpus", "refusal"), [
    # Their sum (2) fits 2 GPUs, but a 0.75 worker and a 0.5 actor never share one.
    (["train.num_workers=2", "train.gpus_per_worker=0.75", "refresh.num_gpus=0.5"], 2,
     "train.use_gpu: the run's GPU shares (train.num_workers=2 x train.gpus_per_worker=0.75, "
     "refresh.num_gpus=0.5) do not fit on this machine's 2 GPUs: Ray never splits a share across GPUs"),
    (["train.num_workers=2", "train.gpus_per_worker=0.75", "refresh.num_gpus=0.25"], 2, None),
    (["train.num_workers=2", "refresh.num_gpus=0.5"], 2, "train.use_gpu: the run needs 2.5 GPUs"),
    (["train.num_workers=2", "refresh.num_gpus=0.5"], 3, None),
    (["train.use_gpu=false", "refresh.num_gpus=1"], 0,
     "refresh.num_gpus: the refresh actor asks for 1 GPUs but this machine has 0; set refresh.num_gpus=0"),
])
def test_gpu_shares_are_checked_as_ray_places_them(shares, gpus, refusal):
    """Ray places a fractional GPU share within one GPU: a run whose shares only fit when
    summed would wait for ever for its refresh actor or its last worker."""
    from pipeline.training.resources import check_fits_locally

    config = load_config("magnet", ["train.use_gpu=true", *shares])
    if refusal is None:
        check_fits_locally(config, {"CPU": 64.0, "GPU": float(gpus)})
    else:
        with pytest.raises(ValueError) as raised:
            check_fits_locally(config, {"CPU": 64.0, "GPU": float(gpus)})
        assert str(raised.value).startswith(refusal)


def test_a_sweep_trial_is_not_checked_against_the_machine_its_driver_function_is_on(
    tmp_path, monkeypatch, ray_must_not_start,
):  # fmt: skip
    """On a cluster Ray puts a trial's driver function on any node, and the trial's run on
    others: the sweep checked its trials against the cluster, so the trial's run is not
    refused for this machine's CPUs (it goes on to Ray, which the fixture refuses)."""
    from pipeline.training.driver import run_training

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config("local", _overrides(tmp_path, [f"train.num_workers={_too_many_workers()[0]}"]))
    with pytest.raises(RunRefused, match="train.num_workers: the run needs"):
        run_training(config, printer=lambda *a, **k: None)
    with pytest.raises(AssertionError, match="reached for Ray"):
        run_training(config, printer=lambda *a, **k: None, in_sweep=True)


def test_a_run_the_dataset_can_serve_passes(tmp_path):
    weights = tmp_path / "tiny_cnn.pth"
    torch.save(EmbeddingNet("tiny_cnn", 8).backbone.state_dict(), weights)  # the presets' backbone
    cache = PreflightCache()
    for preset in ("local", "magnet", "pddm"):
        config = load_config(preset, _overrides(tmp_path, [f"model.pretrained={weights}"]))
        root, metadata = preflight(config, cache)
        assert metadata.splits["train"].num_images == 144 and root.startswith(str(tmp_path / "data"))
    assert cache.weights == {("tiny_cnn", str(weights))}  # loaded once for the three


def test_a_sweep_checks_each_dataset_once_and_every_trial_against_it(tmp_path):
    configs = [
        load_config("local", _overrides(tmp_path, [f"train.seed={seed}"])) for seed in range(3)
    ] + [load_config("local", _overrides(tmp_path, ["sampler.classes_per_batch=20"]))]
    cache = PreflightCache()
    for config in configs[:3]:
        preflight(config, cache)
    assert len(cache.datasets) == 1  # the three configs share their dataset
    with pytest.raises(RunRefused, match="sampler.classes_per_batch: 20 classes per batch"):
        preflight(configs[3], cache)


def test_the_sweep_job_refuses_a_trial_the_dataset_cannot_serve(tmp_path, capsys, ray_must_not_start):
    space = tmp_path / "space.yaml"
    space.write_text(
        "name: too_many_classes\nfixed: {train.epochs: 1}\nsearch: grid\nasha: false\n"
        "space: {sampler.classes_per_batch: {grid: [4, 20]}}\nlosses: {triplet: {}}\n"
    )
    args = [str(space)]
    for item in _overrides(tmp_path, []):
        args += ["--set", item]
    assert sweep_main(args) == 2
    err = capsys.readouterr().err
    assert "sweep error: sampler.classes_per_batch: 20 classes per batch" in err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_the_sweep_job_refuses_trials_a_local_ray_cannot_hold(tmp_path, capsys, monkeypatch, ray_must_not_start):
    """Each run fits, but a trial also holds its driver function's CPU."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local sweep
    have = local_resources()["CPU"]
    workers = int((have - 0.75) // 0.5)  # a run: 0.5 per worker, a decode actor, a read task
    space = tmp_path / "space.yaml"
    space.write_text(
        f"name: too_big\nfixed: {{train.epochs: 1, train.num_workers: {workers}}}\nsearch: grid\n"
        "asha: false\nspace: {train.seed: {grid: [0, 1]}}\nlosses: {triplet: {}}\n"
    )
    args = [str(space)]
    for item in _overrides(tmp_path, []):
        args += ["--set", item]
    assert sweep_main(args) == 2
    assert (f"sweep error: a trial needs {workers * 0.5 + 1.75:g} CPU (driver, workers, decode and "
            f"refresh actors) but the cluster has {have:g}") in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_run_that_fails_after_its_mlflow_run_exists_is_marked_failed(tmp_path, ray_must_not_start):
    """Past the preflight the run exists in MLflow; here `ray.init` then fails (the fixture), and
    the run must say FAILED rather than stay RUNNING forever."""
    from mlflow import MlflowClient

    from pipeline import tracking

    config = load_config("local", _overrides(tmp_path, []))
    with pytest.raises(AssertionError, match="reached for Ray"):
        train_main(["--preset", "local", *[a for item in _overrides(tmp_path, []) for a in ("--set", item)]])
    client = MlflowClient(tracking.tracking_uri(config))
    runs = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_a_run_name_reused_before_its_first_checkpoint_is_checked_against_its_mlflow_run(
    tmp_path, capsys, ray_must_not_start
):
    """A run stopped before its first checkpoint leaves no weights, but its MLflow run is
    reopened by a rerun of the same name: another loss would write into the triplet's record."""
    from mlflow import MlflowClient

    from pipeline import tracking

    settings = _overrides(tmp_path, ["train.run_name=exp1"])
    argv = ["--preset", "local", *[a for item in settings for a in ("--set", item)]]
    with pytest.raises(AssertionError, match="reached for Ray"):  # the first attempt stops there
        train_main(argv)
    assert train_main([*argv, "--set", "loss.name=contrastive", "--set", "model.embedding_dim=32"]) == 2
    config = load_config("local", settings)
    client = MlflowClient(tracking.tracking_uri(config))
    [run] = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert capsys.readouterr().err.strip() == (
        f"error: train.run_name: run 'exp1' has no checkpoint yet, but an MLflow run ({run.info.run_id}) "
        "trained with other settings, and a rerun would write into its record: loss.name: 'triplet' -> "
        "'contrastive'; model.embedding_dim: 64 -> 32. Choose another train.run_name for a new run, or "
        "rerun with its settings"
    )
    assert run.data.params["loss.name"] == "triplet" and run.info.status == "FAILED"
    with pytest.raises(AssertionError, match="reached for Ray"):  # the same settings go on
        train_main([*argv, "--set", "train.epochs=3"])


def test_a_run_another_process_is_training_is_refused_until_that_process_ends(tmp_path, ray_must_not_start):
    """The same command started twice: the second would train into the first's checkpoint
    folder and MLflow run. The lock goes with the process that holds it, even one killed."""
    from lock_holder import lock_held_elsewhere

    from pipeline.training.driver import run_training
    from pipeline.training.run_lock import LOCK_DIR

    config = load_config("local", _overrides(tmp_path, ["train.run_name=busy"]))
    with lock_held_elsewhere(f"{config.train.storage_path}/{LOCK_DIR}", "busy") as holder:
        with pytest.raises(RunRefused, match=rf"^train.run_name: run 'busy' is being trained by pid {holder.pid} on "):
            run_training(config, printer=lambda *a, **k: None)
        holder.kill()
        holder.wait()
    with pytest.raises(AssertionError, match="reached for Ray"):  # free again: it goes on
        run_training(config, printer=lambda *a, **k: None)


def test_a_run_on_s3_storage_another_job_is_training_is_refused_until_that_job_ends(
    tmp_path, s3_server, s3_bucket, restored_environ, ray_must_not_start, monkeypatch,
):  # fmt: skip
    """The same, with the checkpoints in S3: the lock is a lease object (pipeline.locks), which
    the holder deletes when it ends; the refused run neither takes nor touches it."""
    import os

    import boto3
    from lock_holder import lock_held_elsewhere

    from pipeline.training.driver import run_training
    from pipeline.training.run_lock import LOCK_DIR

    # The run that gets past the lock opens its local MLflow store under ./runs/s3/...: here, not
    # in the checkout the tests run from.
    monkeypatch.chdir(tmp_path)
    storage = f"s3://{s3_bucket}/runs"
    config = load_config("local", _overrides(tmp_path, [
        "train.run_name=busy", f"train.storage_path={storage}", f"storage.s3_endpoint_url={s3_server}",
    ]))  # fmt: skip
    client = boto3.client("s3", endpoint_url=s3_server)
    key = f"runs/{LOCK_DIR}/busy.lock"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server}
    with lock_held_elsewhere(f"{storage}/{LOCK_DIR}", "busy", env=env) as holder:
        held = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        with pytest.raises(RunRefused, match=(
            rf"^train.run_name: run 'busy' is being trained by pid {holder.pid} on \S+ \(if that process "
            r"is gone, its lock lapses in \d+ s\); wait for it to end"
        )):  # fmt: skip
            run_training(config, printer=lambda *a, **k: None)
        assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == held
    with pytest.raises(client.exceptions.NoSuchKey):  # given back on the holder's way out
        client.get_object(Bucket=s3_bucket, Key=key)
    with pytest.raises(AssertionError, match="reached for Ray"):  # free again: it goes on
        run_training(config, printer=lambda *a, **k: None)
    with pytest.raises(client.exceptions.NoSuchKey):  # and the run that stopped gave it back
        client.get_object(Bucket=s3_bucket, Key=key)
