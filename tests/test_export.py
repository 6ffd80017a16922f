"""Using a trained model: finding checkpoints, the export job's embeddings and faiss index, and
the evaluate job's MLflow record. The checkpoint is written without Ray (a fresh model)."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, config_to_yaml, load_config
from pipeline.data.format import read_metadata, read_split
from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic
from pipeline.evaluation.protocol import resolve_evaluation
from pipeline.serving.checkpoints import CheckpointNotFound, locate_checkpoint

TINY = [
    "data.synthetic.num_classes=8",
    "data.synthetic.images_per_class=10",
    "data.synthetic.image_size=32",
    "data.image_size=24",
    "data.eval_resize=28",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with one checkpoint (step 4) of a freshly built model, and its dataset."""
    from pipeline.learner import MetricLearner
    from pipeline.losses import build_loss
    from pipeline.models import build_model
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.driver import run_name_for
    from pipeline.training.optim import build_optimizer, build_scheduler

    root = tmp_path_factory.mktemp("export")
    config = load_config(
        "local",
        TINY
        + [
            f"data.cache_dir={root / 'data'}",
            f"train.storage_path={root / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        ],
    )
    dataset_root = ensure_synthetic(
        config.data.cache_dir, SyntheticSpec(**vars(config.data.synthetic))
    )
    torch.manual_seed(0)
    learner = MetricLearner(
        build_model(config.model), build_loss(config.loss, 4, config.model.embedding_dim)
    )
    optimizer = build_optimizer(learner.embedder, learner.loss, config.optim, config.loss.lr)
    scheduler = build_scheduler(optimizer, config.optim, 8)
    run_dir = root / "runs" / run_name_for(config)
    checkpoint = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    # As training saves it: the config with the dataset's protocol filled in, which no longer
    # hashes to the run's name, and the run's record.
    resolved = resolve_evaluation(config, read_metadata(dataset_root))
    save_checkpoint(
        str(checkpoint),
        learner=learner,
        optimizer=optimizer,
        scheduler=scheduler,
        step=4,
        epoch=1,
        config_yaml=config_to_yaml(resolved),
        metrics={"step": 4, "epoch": 1},
        run={"run_name": run_dir.name, "run_id": "0123abcd", "dataset_fingerprint": "f"},
    )
    return {
        "root": root,
        "config": config,
        "dataset": dataset_root,
        "run_dir": run_dir,
        "checkpoint": checkpoint,
        "model": learner.embedder.eval(),
    }


def in_process_embeddings(model, config, dataset_root, split="test"):
    """ids and embeddings of a split computed here, one image at a time, with the eval transform."""
    from pipeline.data.decoding import decode_rgb, eval_transform

    table = read_split(dataset_root, split, ["id", "image"])
    transform = eval_transform(config.data.image_size, config.data.eval_resize)
    images = torch.stack(
        [transform(decode_rgb(data)) for data in table.column("image").to_pylist()]
    )
    with torch.no_grad():
        embeddings = model(images.float().div(255)).numpy()
    return table.column("id").to_numpy(), embeddings


def test_a_checkpoint_is_found_by_directory_run_directory_or_run_name(trained):
    storage = str(trained["root"] / "runs")
    expected = str(trained["checkpoint"])
    assert locate_checkpoint(expected, "unused")[1] == expected
    assert locate_checkpoint(str(trained["run_dir"]), "unused")[1] == expected
    assert locate_checkpoint(trained["run_dir"].name, storage)[1] == expected

    with pytest.raises(CheckpointNotFound, match="no run of that name"):
        locate_checkpoint("no-such-run", storage)
    with pytest.raises(CheckpointNotFound, match="no such directory"):
        locate_checkpoint(str(trained["root"] / "missing"), storage)
    model_file = str(trained["checkpoint"] / "model.pt")
    with pytest.raises(CheckpointNotFound, match="model.pt: a file, not a checkpoint directory"):
        locate_checkpoint(model_file, storage)
    with pytest.raises(CheckpointNotFound, match="neither model.pt"):
        locate_checkpoint(str(trained["root"] / "data"), storage)


def test_export_refuses_bad_input_and_keeps_what_is_there(trained, tmp_path):
    from pipeline.serving.export import export_embeddings

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    args = (str(trained["checkpoint"]), trained["dataset"])
    with pytest.raises(FileExistsError, match="not empty"):
        export_embeddings(*args, str(taken))
    assert (taken / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="split 'query'.*has no such split"):
        export_embeddings(*args, str(tmp_path / "out"), split="query")
    with pytest.raises(ValueError, match="index description 'Bogus'"):
        export_embeddings(*args, str(tmp_path / "out"), index_description="Bogus")
    assert not (tmp_path / "out").exists()


def test_export_job_refuses_an_index_the_split_cannot_train_before_ray(
    trained, tmp_path, capsys, ray_must_not_start
):
    from jobs.export_embeddings import main as export_main

    out = tmp_path / "out"
    num_images = read_split(trained["dataset"], "test", ["id"]).num_rows
    argv = [str(trained["checkpoint"]), trained["dataset"], str(out), "--index", "IVF1024,Flat"]
    assert export_main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --index: 'IVF1024,Flat' trains on the {num_images} images of split 'test' but "
        f"needs at least 1024; use fewer lists or Flat"
    )
    assert not out.exists()


def test_export_job_refuses_a_mistyped_uri_before_ray(trained, tmp_path, monkeypatch, capsys, ray_must_not_start):
    from jobs.export_embeddings import main as export_main

    monkeypatch.chdir(tmp_path)
    assert export_main([str(trained["checkpoint"]), trained["dataset"], "s3:bucket/out"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: out_dir: 's3:bucket/out' is neither a path nor a URI; did you mean 's3://bucket/out'?"
    )
    assert not (tmp_path / "s3:bucket").exists()


def _damaged(trained, tmp_path, name: str, content: bytes | None):
    """A copy of the trained checkpoint with file `name` replaced by `content` (None: removed)."""
    copy = tmp_path / "damaged"
    shutil.copytree(trained["checkpoint"], copy)
    if content is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(content)
    return copy


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("model.pt", b"not a torch file", "model.pt: does not load"),
        ("config.yaml", b"model: [unclosed", "config.yaml: does not load"),
        ("config.yaml", b"model:\n  backbonez: tiny_cnn\n", "config.yaml: does not load (model.backbonez"),
        ("metrics.json", None, "metrics.json: does not load"),
        ("metrics.json", b"{step: 4", "metrics.json: does not load"),
    ],
)
def test_evaluate_and_export_name_the_checkpoint_file_that_does_not_load_before_ray(
    trained, tmp_path, capsys, ray_must_not_start, name, content, says
):
    from jobs.evaluate import main as evaluate_main
    from jobs.export_embeddings import main as export_main

    checkpoint = _damaged(trained, tmp_path, name, content)
    assert export_main([str(checkpoint), trained["dataset"], str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {checkpoint}/{says}")
    assert evaluate_main([str(checkpoint)]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {checkpoint}/{says}")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_checkpoint_s_config_are_named_before_ray(
    trained, tmp_path, capsys, ray_must_not_start
):
    from jobs.evaluate import main as evaluate_main

    checkpoint = _damaged(trained, tmp_path, "config.yaml", None)
    text = (trained["checkpoint"] / "config.yaml").read_text()
    dim = trained["config"].model.embedding_dim
    (checkpoint / "config.yaml").write_text(text.replace(f"embedding_dim: {dim}", f"embedding_dim: {dim * 2}"))
    assert evaluate_main([str(checkpoint)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: checkpoint {checkpoint}/model.pt: does not fit the network its config.yaml describes "
        f"(model.backbone 'tiny_cnn', model.embedding_dim {dim * 2}) (Error(s) in loading state_dict"
    )


def test_a_dataset_root_that_is_a_file_and_bad_export_sizes_are_named_before_ray(
    trained, tmp_path, capsys, monkeypatch, ray_must_not_start
):
    from jobs.evaluate import main as evaluate_main
    from jobs.export_embeddings import main as export_main

    a_file = tmp_path / "a_file"
    a_file.write_text("not a dataset")
    assert export_main([str(trained["checkpoint"]), str(a_file), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {a_file}/metadata.json: no such file (not a dataset root?)"
    )
    assert evaluate_main([str(trained["checkpoint"]), "--set", f"data.root={a_file}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {a_file}/metadata.json: no such file (not a dataset root?)"
    )
    # A run name under the export's own flag is looked up there, and the refusal names the flag.
    runs = tmp_path / "runs"
    assert export_main(["no-such-run", trained["dataset"], str(tmp_path / "out"), "--storage-path", str(runs)]) == 2
    assert f"no run of that name has a checkpoint under --storage-path={runs} " in capsys.readouterr().err
    # More embedding actors than a local Ray holds: Ray Data would wait for them for ever.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert export_main([str(trained["checkpoint"]), trained["dataset"], str(tmp_path / "out"), "--actors", "500"]) == 2
    assert "error: --actors: 500 embedding actors " in capsys.readouterr().err
    for flags in (["--batch-size", "-5"], ["--actors", "-3"], ["--cpus", "-1"]):
        assert export_main([str(trained["checkpoint"]), trained["dataset"], str(tmp_path / "out"), *flags]) == 2
        assert "error: --batch-size, --actors and --cpus: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_checks_overrides_against_the_checkpoint_s_config_not_the_defaults(
    trained, tmp_path, capsys, ray_must_not_start
):
    """A checkpoint trained at 224 px (eval_resize 256) may be evaluated at 240 px, which the
    defaults (eval_resize 56) would refuse; what is wrong with the checkpoint's own config is
    still refused, before Ray."""
    from jobs.evaluate import main as evaluate_main
    from pipeline.serving.evaluation import evaluation_config, storage_path_of

    gpu = load_config("gpu", [f"train.storage_path={tmp_path / 'runs'}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(gpu))
    assert storage_path_of(["data.image_size=240"]) == "runs"
    with pytest.raises(ConfigError, match=r"^eval\.batch_size: must be > 0, got 0$"):  # a value wrong on its own
        storage_path_of(["eval.batch_size=0"])  # is refused before the checkpoint is fetched
    assert evaluation_config(str(saved), gpu, ["data.image_size=240"]).data.image_size == 240

    resize = trained["config"].data.eval_resize
    assert evaluate_main([str(trained["checkpoint"]), "--set", f"data.image_size={resize + 4}"]) == 2
    assert capsys.readouterr().err.startswith(f"config error: data.eval_resize: {resize} is smaller than data.image_size")


def test_the_embedding_actors_run_where_device_says():
    """`auto` follows the GPUs up now; `gpu` asks for one per actor even when none is up (an
    autoscaling cluster then adds GPU nodes, where `auto` would settle for CPUs)."""
    from pipeline.serving.embedding import CPU_ACTOR_CPUS, embedding_actors

    on_cpus = {"num_gpus": 0, "num_cpus": CPU_ACTOR_CPUS}
    assert embedding_actors("auto", 0, gpus_up=0) == {"size": 1, **on_cpus}
    assert embedding_actors("auto", 0, gpus_up=4) == {"size": 4, "num_gpus": 1, "num_cpus": 1}
    assert embedding_actors("gpu", 0, gpus_up=0) == {"size": 1, "num_gpus": 1, "num_cpus": 1}
    assert embedding_actors("gpu", 3, gpus_up=0) == {"size": 3, "num_gpus": 1, "num_cpus": 1}
    assert embedding_actors("cpu", 0, gpus_up=4) == {"size": 1, **on_cpus}
    assert embedding_actors("cpu", 6, gpus_up=4) == {"size": 6, **on_cpus}
    with pytest.raises(ValueError, match=r"^--device: 'tpu' is not one of auto, gpu, cpu$"):
        embedding_actors("tpu", 0, gpus_up=0)


def test_the_evaluate_job_s_metrics_are_computed_where_the_images_were_embedded():
    """On a GPU when the embedding actors had GPUs, else on the CPUs the task reserves (never
    the driver: see `test_export_and_evaluate_jobs`)."""
    from pipeline.serving.evaluation import metrics_task_resources

    on_gpu, on_cpus = {"num_gpus": 1, "num_cpus": 1}, {"num_gpus": 0, "num_cpus": 6}
    assert metrics_task_resources("auto", gpus_up=2, cpus=6) == on_gpu
    assert metrics_task_resources("auto", gpus_up=0, cpus=6) == on_cpus
    assert metrics_task_resources("gpu", gpus_up=0, cpus=6) == on_gpu  # the autoscaler adds a GPU node
    assert metrics_task_resources("cpu", gpus_up=2, cpus=6) == on_cpus


def test_the_metrics_task_reserves_the_cpus_it_ranks_on(ray_local):
    """`eval.metrics_cpus` when set, else the CPUs free on the node with most; and inside the task,
    faiss and torch get as many threads as it reserved, whatever the worker ran before."""
    import ray

    from pipeline.serving.driver_tasks import task_cpus, use_reserved_cpus

    assert task_cpus(3, free_per_node=[40.0]) == 3
    assert task_cpus(0, free_per_node=[40.0, 8.0]) == 40
    assert task_cpus(0, free_per_node=[20.0, 30.0, 10.0]) == 30  # one task, one node: not 60
    assert task_cpus(0, free_per_node=[2.5]) == 2
    assert task_cpus(0, free_per_node=[0.5, 0.0]) == 1  # busy: waits for one
    assert task_cpus(0, free_per_node=[]) == 1
    _free_cpus_per_node_falls_by_what_an_actor_holds()

    def threads_in_task():  # (nested: Ray ships it by value, the workers cannot import tests/)
        import faiss
        import torch

        return use_reserved_cpus(), faiss.omp_get_max_threads(), torch.get_num_threads()

    cores = len(os.sched_getaffinity(0))
    task = ray.remote(threads_in_task)
    for cpus in (2, 1, 2):  # the same worker may take each in turn
        expected = min(cpus, cores)
        assert ray.get(task.options(num_cpus=cpus).remote()) == (expected, expected, expected)


def _free_cpus_per_node_falls_by_what_an_actor_holds():
    """On the session's one-node Ray, the GCS's per-node figure is the cluster's free CPUs, and
    an actor's reservation takes its CPUs from it (not from the node's total)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    from pipeline.serving.driver_tasks import free_cpus_per_node, node_free_cpus

    @ray.remote(num_cpus=1.5)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    try:
        ray.get(holder.ready.remote(), timeout=120)
        total = ray.cluster_resources()["CPU"]
        deadline = time.monotonic() + 30  # the raylet reports its use to the GCS every so often
        while True:
            per_node = node_free_cpus(get_cluster_status(ray.get_runtime_context().gcs_address))
            free = ray.available_resources().get("CPU", 0)
            if len(per_node) == 1 and per_node[0] == pytest.approx(free) and free <= total - 1.5:
                break
            assert time.monotonic() < deadline, (per_node, free, total)
            time.sleep(0.2)
        assert free_cpus_per_node() == pytest.approx(per_node)
    finally:
        ray.kill(holder)


def test_free_cpus_are_counted_per_node_that_may_take_a_task():
    """Nodes as the GCS's cluster status lists them: a draining node (the autoscaler is ending
    it, so Ray places nothing there, though all its CPUs are free) and nodes not up count for
    nothing."""
    from ray.autoscaler.v2.schema import ClusterStatus, NodeInfo, NodeUsage, ResourceUsage

    from pipeline.serving.driver_tasks import node_free_cpus

    def node(status, cpus=None, used=0.0, gpus=0):
        usage = None if cpus is None else NodeUsage(
            [ResourceUsage("CPU", cpus, used), ResourceUsage("GPU", gpus, 0.0)], idle_time_ms=0)
        return NodeInfo("m5.2xlarge", "worker", "i-1", "10.0.0.1", node_status=status, resource_usage=usage)

    status = ClusterStatus(
        active_nodes=[node("RUNNING", 48, used=40, gpus=4), node("RUNNING", 16, used=4), node("DRAINING", 192)],
        idle_nodes=[node("IDLE", 8)],
        pending_nodes=[node("ALLOCATING")],
        failed_nodes=[node("DEAD")],
    )
    assert node_free_cpus(status) == [8.0, 12.0, 8.0]
    gpu_only = NodeInfo("x", "y", "z", "w", node_status="RUNNING",
                        resource_usage=NodeUsage([ResourceUsage("GPU", 1, 0)], idle_time_ms=0))
    assert node_free_cpus(ClusterStatus(active_nodes=[gpu_only])) == []


def test_metrics_cpus_a_local_ray_cannot_give_are_refused_before_ray(
    trained, capsys, monkeypatch, ray_must_not_start
):
    """The metrics task would wait for ever, and only after every image was embedded."""
    from jobs.evaluate import main as evaluate_main
    from pipeline.training.resources import local_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    have = local_resources()
    too_many = int(have["CPU"]) + 1
    assert evaluate_main([str(trained["checkpoint"]), "--device", "cpu", "--set", f"eval.metrics_cpus={too_many}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: eval.metrics_cpus: {too_many} CPUs do not fit the {have['CPU']:g} logical CPUs of a local Ray; "
    )
    assert evaluate_main([str(trained["checkpoint"]), "--set", "eval.metrics_cpus=-1"]) == 2
    assert "eval.metrics_cpus: must be >= 0, got -1" in capsys.readouterr().err


def test_bad_input_found_by_the_metrics_task_is_named_without_a_ray_traceback(ray_local):
    import ray

    from pipeline.serving.driver_tasks import task_result

    def refuse(kind):  # (nested: Ray ships it by value, the workers cannot import tests/)
        raise kind("retrieval metrics need at least 2 items")

    task = ray.remote(num_cpus=0.25)(refuse)
    with pytest.raises(ValueError) as raised:
        task_result(task.remote(ValueError))
    assert type(raised.value) is ValueError and str(raised.value) == "retrieval metrics need at least 2 items"
    with pytest.raises(ray.exceptions.RayTaskError):  # a failure, not bad input: Ray's whole report
        task_result(task.remote(RuntimeError))


def test_collected_embeddings_are_in_id_order_whatever_order_the_blocks_come_in(ray_local):
    import ray
    from ray.data.dataset import MaterializedDataset

    from pipeline.serving.embedding import collect_embeddings, embeddings_table

    rng = np.random.default_rng(4)
    ids = rng.permutation(np.arange(0, 300, 3))  # not 0..N-1: dataset ids need not be
    embeddings = rng.standard_normal((len(ids), 5)).astype(np.float32)
    pieces = [slice(0, 40), slice(40, 40), slice(40, 100)]  # one empty block
    blocks = [embeddings_table(ids[p], ids[p] % 7, embeddings[p]) for p in pieces]
    materialized = ray.data.from_arrow(blocks)
    # Not materialized (as an export's embedding on its driver): its blocks are read twice.
    lazy = ray.data.from_arrow(blocks[::-1]).map_batches(lambda table: table, batch_format="pyarrow")
    assert not isinstance(lazy, MaterializedDataset)
    order = np.argsort(ids)
    for dataset in (materialized, lazy):
        got_ids, got_labels, got_embeddings = collect_embeddings(dataset)
        np.testing.assert_array_equal(got_ids, ids[order])
        np.testing.assert_array_equal(got_labels, ids[order] % 7)
        np.testing.assert_array_equal(got_embeddings, embeddings[order])
        assert got_embeddings.dtype == np.float32 and got_labels.dtype == np.int32
    with pytest.raises(ValueError, match="the split yielded no images"):
        collect_embeddings(ray.data.from_arrow([blocks[1]]))
    with pytest.raises(RuntimeError, match=r"the embedded split's images came more than once: ids \[\d+\]"):
        collect_embeddings(ray.data.from_arrow([blocks[0], blocks[0].slice(3, 1), blocks[2]]))


def test_device_gpu_without_a_gpu_is_refused_before_ray(trained, tmp_path, capsys, monkeypatch, ray_must_not_start):
    """A local Ray without a GPU would leave GPU actors waiting for ever."""
    import torch

    from jobs.evaluate import main as evaluate_main
    from jobs.export_embeddings import main as export_main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device gpu is satisfiable here")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    says = "error: --device gpu: this machine has no GPU for the embedding actors; use --device auto or cpu"
    assert export_main([str(trained["checkpoint"]), trained["dataset"], str(tmp_path / "out"), "--device", "gpu"]) == 2
    assert capsys.readouterr().err.startswith(says)
    assert not (tmp_path / "out").exists()
    assert evaluate_main([str(trained["checkpoint"]), "--device", "gpu"]) == 2
    assert capsys.readouterr().err.startswith(says)


def test_an_export_into_a_directory_another_export_is_writing_is_refused_before_ray(
    trained, tmp_path, ray_must_not_start,
):  # fmt: skip
    """Two exports into one new directory at once would write their files over each other's.
    What the lock leaves in a local directory does not count as content."""
    from lock_holder import lock_held_elsewhere

    from pipeline.serving.export import LOCK_NAME, export_embeddings

    out = tmp_path / "out"
    args = (str(trained["checkpoint"]), trained["dataset"], str(out))
    with lock_held_elsewhere(str(out), LOCK_NAME) as holder:
        with pytest.raises(ValueError, match=(
            rf"^output directory {out}: another export is writing into it \(pid {holder.pid} on \S+\); "
            "choose a new directory$"
        )):  # fmt: skip
            export_embeddings(*args, printer=lambda *a, **k: None)
    assert [p.name for p in out.iterdir()] == [f"{LOCK_NAME}.lock"]
    with pytest.raises(AssertionError, match="reached for Ray"):  # ended: this one goes on
        export_embeddings(*args, printer=lambda *a, **k: None)
    # An export that fails leaves no directory it made that holds only its lock.
    with pytest.raises(AssertionError, match="reached for Ray"):
        export_embeddings(*args[:2], str(tmp_path / "new"), printer=lambda *a, **k: None)
    assert not (tmp_path / "new").exists()


def test_on_a_cluster_an_s3_export_is_written_by_a_task_and_a_local_one_by_the_driver(
    ray_local, trained, s3_server, s3_bucket, tmp_path, monkeypatch
):
    """A local directory on a cluster is the driver's own disk, so the driver writes it; an
    s3:// one is written by a Ray task, which reaches the store through the job's settings, off
    the head node. With a local Ray the driver's machine is the cluster: the driver writes."""
    import boto3
    import ray

    import pipeline.serving.export as export
    from jobs.export_embeddings import main as export_main
    from pipeline.serving.index import load_index, read_embeddings

    ids, expected = in_process_embeddings(trained["model"], trained["config"], trained["dataset"])
    written_here = []
    write_export = export.write_export

    def write_here(dataset, export_dir, *args):
        written_here.append(export_dir)
        return write_export(dataset, export_dir, *args)

    monkeypatch.setattr(export, "write_export", write_here)  # (a task's worker imports its own)
    asked_cpus = []
    cluster_task_cpus = export.cluster_task_cpus
    monkeypatch.setattr(export, "cluster_task_cpus", lambda cpus: asked_cpus.append(cpus) or cluster_task_cpus(cpus))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    remote, local = f"s3://{s3_bucket}/exports/test", str(tmp_path / "export")
    on_local_ray = f"s3://{s3_bucket}/exports/local-ray"
    for out in (remote, local, on_local_ray):
        if out == on_local_ray:
            monkeypatch.delenv("RAY_ADDRESS")
        else:
            monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # "on a cluster"
        assert export_main([str(trained["checkpoint"]), trained["dataset"], out, "--device", "cpu", "--cpus", "1"]) == 0
        exported_ids, _, embeddings = read_embeddings(out)
        np.testing.assert_array_equal(exported_ids, ids)
        np.testing.assert_allclose(embeddings, expected, atol=1e-5)
        index = load_index(out)
        assert index.ntotal == len(ids)
        np.testing.assert_array_equal(index.search(embeddings[:3], 1)[1][:, 0], exported_ids[:3])
    assert written_here == [local, on_local_ray]
    assert asked_cpus == [1]
    # The task's export is whole and its lock gone (pyarrow's empty "directory/" markers aside).
    keys = {item["Key"] for item in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=s3_bucket, Prefix="exports/test/")["Contents"] if not item["Key"].endswith("/")}
    assert keys == {f"exports/test/{name}" for name in ("embeddings/part-00000.parquet", "index.faiss", "export.json")}

    # A driver stopped while the task writes (Ctrl+C) cancels it before its lock is let go.
    started = []

    def stopped(ref):
        started.append(ref)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "task_result", stopped)
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    with pytest.raises(KeyboardInterrupt):
        export.export_embeddings(str(trained["checkpoint"]), trained["dataset"], f"s3://{s3_bucket}/exports/stopped",
                                 device="cpu", printer=lambda *a, **k: None)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(started[0], timeout=60)


def test_index_search_matches_brute_force_and_returns_ids():
    from pipeline.serving.index import build_index

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((300, 16)).astype(np.float32)
    ids = rng.permutation(10_000)[:300]
    _, found = build_index(embeddings, ids).search(embeddings[:20], 5)
    exact = (
        (embeddings[:20, None, :].astype(np.float64) - embeddings[None].astype(np.float64)) ** 2
    ).sum(-1)
    np.testing.assert_array_equal(found, ids[np.argsort(exact, axis=1)[:, :5]])


@pytest.mark.ray
def test_export_and_evaluate_jobs(ray_local, trained, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from jobs.evaluate import main as evaluate_main
    from jobs.export_embeddings import main as export_main
    from pipeline.evaluation.metrics import retrieval_metrics
    from pipeline.serving.index import load_index, read_embeddings

    config, dataset = trained["config"], trained["dataset"]
    ids, expected = in_process_embeddings(trained["model"], config, dataset)

    out = tmp_path / "export"
    assert (
        export_main(
            [
                trained["run_dir"].name,
                dataset,
                str(out),
                "--storage-path",
                str(trained["root"] / "runs"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    exported_ids, labels, embeddings = read_embeddings(str(out))
    np.testing.assert_array_equal(exported_ids, ids)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    test_labels = read_split(dataset, "test", ["label"]).column("label").to_numpy()
    np.testing.assert_array_equal(labels, test_labels)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["num_embeddings"] == len(ids) and manifest["checkpoint_step"] == 4
    assert manifest["checkpoint"] == str(trained["checkpoint"]) and manifest["split"] == "test"

    # The saved index answers like brute force in float64 over the exported embeddings.
    index = load_index(str(out))
    queries = embeddings[::7]
    distances, found = index.search(queries, 6)
    exact = (
        (queries[:, None, :].astype(np.float64) - embeddings[None].astype(np.float64)) ** 2
    ).sum(-1)
    order = np.argsort(exact, axis=1, kind="stable")[:, :6]
    np.testing.assert_allclose(distances, np.take_along_axis(exact, order, 1), atol=1e-5)
    np.testing.assert_array_equal(found, exported_ids[order])

    # An export whose manifest is not there (its job still running, or stopped) is not read.
    from pipeline.serving.index import ExportUnfinished

    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "export.json").unlink()
    for read in (load_index, read_embeddings):
        with pytest.raises(ExportUnfinished, match=f"{unfinished}: no export.json, so not a finished export"):
            read(str(unfinished))

    # The evaluate job finds the run by name, evaluates the test split and records it. With a
    # slow tracking server its metrics still arrive before the job returns (and its process ends).
    log_batch = MlflowClient.log_batch

    def slow_log_batch(self, *args, **kwargs):
        time.sleep(2.0)
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", slow_log_batch)
    # The embeddings and the metrics stay off the driver (a Ray task computes them).
    import pipeline.serving.evaluation as evaluation

    def on_the_driver(*args, **kwargs):
        raise AssertionError("the evaluation's embeddings reached the driver")

    monkeypatch.setattr(evaluation, "collect_embeddings", on_the_driver)
    monkeypatch.setattr(evaluation, "retrieval_metrics", on_the_driver)
    storage = f"train.storage_path={trained['root'] / 'runs'}"
    assert evaluate_main([trained["run_dir"].name, "--set", storage]) == 0
    monkeypatch.undo()
    client = MlflowClient(config.tracking.tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(config.tracking.experiment).experiment_id],
        filter_string="tags.`pipeline.kind` = 'evaluation'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["evaluation.source_run"] == trained["run_dir"].name
    assert run.data.tags["evaluation.source_run_id"] == "0123abcd"
    assert run.data.tags["evaluation.checkpoint"] == str(trained["checkpoint"])
    reference = retrieval_metrics(expected, test_labels, ks=(1, 2, 4, 8))
    for key in ("recall@1", "recall@8", "map@r", "r_precision", "nmi"):
        logged = client.get_metric_history(run.info.run_id, f"test/{key.replace('@', '_at_')}")
        assert [m.step for m in logged] == [4], key
        assert logged[0].value == pytest.approx(reference[key], abs=1e-6), key

    # An unknown run name stops before anything runs, with a message that names it.
    assert evaluate_main(["no-such-run", "--set", storage]) == 2
