"""Magnet end to end on Ray: 2 workers, the refresh actor re-clustering while training runs,
its metrics in MLflow, its state in the checkpoint, and a run that survives killing it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from short_runs import SHORT_MAGNET

from pipeline.config import load_config

pytestmark = pytest.mark.ray

TINY = SHORT_MAGNET


def _config(tmp_path, extra):
    return load_config(
        "magnet",
        TINY + [f"data.cache_dir={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}"] + extra,
    )


def test_refreshes_run_alongside_training_and_are_recorded(ray_local, tmp_path, metric_history):
    from mlflow import MlflowClient

    from pipeline.training.driver import run_training

    # Four times the images of the other tests: a refresh (embedding the whole training set)
    # then outlasts a training step, as it does at any real size. At 16 per class it took
    # ~0.1 s against ~0.12 s a step, and whether a step fell inside one was chance.
    config = _config(tmp_path, ["train.epochs=2", "train.steps_per_epoch=10", "refresh.every_steps=2",
                                "data.synthetic.images_per_class=64"])
    summary = run_training(config, printer=lambda *a, **k: None)
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.run_id
    assert summary.not_logged == ()  # the refresh actor's metrics included

    # The initial index plus at least two refreshes, each timed (embedding and clustering apart).
    count = metric_history(client, run_id, "refresh/count")
    assert count[-1].value >= 3, count
    embed_seconds = metric_history(client, run_id, "refresh/embed_seconds")
    assert embed_seconds and all(m.value > 0 for m in embed_seconds)
    assert metric_history(client, run_id, "refresh/cluster_seconds")

    # The planner moved to newer indexes as they appeared (not strictly in order: a decode
    # actor may plan two sub-batches at once), and staleness was measured.
    used = [m.value for m in metric_history(client, run_id, "refresh/index_version_used")]
    assert len(used) == 20 and used[-1] > used[0] and max(used) >= 3, used
    staleness = [m.value for m in metric_history(client, run_id, "refresh/staleness_steps")]
    assert all(s >= 0 for s in staleness) and max(staleness) < 20

    # Training went on while refreshes ran: ranks reported steps during some refresh.
    during = [m.value for m in metric_history(client, run_id, "refresh/steps_during")]
    assert sum(during) > 0, during

    # Magnet inference on the held-out seen classes, beside retrieval on the unseen ones.
    seen = metric_history(client, run_id, "seen/magnet_accuracy")
    assert [m.step for m in seen] == [10, 20]
    assert 0.0 <= summary.metrics["seen/magnet_accuracy"] <= 1.0
    # And the kNN accuracy every loss gets on the same hold-out, for comparing with Magnet's.
    assert [m.step for m in metric_history(client, run_id, "seen/knn_accuracy")] == [10, 20]
    assert 0.0 <= summary.metrics["test/recall@1"] <= 1.0

    # The actor's index and losses are saved with the checkpoint.
    assert (Path(summary.checkpoint_path) / "refresh_state.npz").exists()


def test_run_finishes_when_the_refresh_actor_is_killed(ray_local, tmp_path, metric_history):
    import ray
    from mlflow import MlflowClient

    from pipeline.refresh.actor import refresh_actor_name
    from pipeline.training.driver import run_name_for, run_training

    config = _config(tmp_path, ["train.epochs=3", "train.steps_per_epoch=10", "refresh.every_steps=3"])
    name = refresh_actor_name(run_name_for(config))
    killed: dict = {}

    def kill_after_second_index():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                actor = ray.get_actor(name)
                status = ray.get(actor.status.remote(), timeout=10)
            except Exception:  # not started yet
                time.sleep(0.2)
                continue
            if status["version"] >= 2:
                killed.update(status)
                ray.kill(actor, no_restart=False)  # Ray restarts it (refresh.max_restarts)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_second_index, daemon=True)
    killer.start()
    summary = run_training(config, printer=lambda *a, **k: None)
    killer.join(timeout=10)
    assert killed, "the actor was never seen with a second index"

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert summary.metrics["step"] == 30
    # The restarted incarnation rebuilt the index from rank 0's latest weights...
    rebuilt = [m for m in metric_history(client, summary.run_id, "refresh/reconstructed") if m.value == 1.0]
    assert rebuilt, "no refresh by the restarted actor"
    assert rebuilt[0].step > 0, "rebuilt from trained weights, not the initial model"
    # ...numbered after the versions in use before the kill, while every step went on with
    # an index it had.
    versions = [m.value for m in metric_history(client, summary.run_id, "refresh/version")]
    assert max(versions) > killed["version"], (versions, killed)
    used = [m.value for m in metric_history(client, summary.run_id, "refresh/index_version_used")]
    assert len(used) == 30 and min(used) >= 1, used


def test_resumed_run_goes_on_from_the_checkpointed_index(ray_local, tmp_path, metric_history):
    import numpy as np
    from mlflow import MlflowClient

    from pipeline.training.driver import run_training
    from pipeline.training.refresh_link import REFRESH_STATE_FILE

    base = ["train.steps_per_epoch=8", "refresh.every_steps=4", "train.run_name=magnet-resume"]
    first = run_training(_config(tmp_path, base + ["train.epochs=1"]), printer=lambda *a, **k: None)
    with np.load(Path(first.checkpoint_path) / REFRESH_STATE_FILE) as saved:
        saved_step, saved_version = int(saved["index.model_step"]), int(saved["version"])
    between_ms = time.time() * 1000

    # A new driver, the same run name, one more epoch: Ray Train resumes from step 8 and the
    # new refresh actor starts from the checkpoint's index and losses.
    lines: list[str] = []
    second = run_training(_config(tmp_path, base + ["train.epochs=2"]),
                          printer=lambda text, **_: lines.append(text))
    assert second.run_id == first.run_id and second.metrics["step"] == 16
    assert any("resumed from step 8" in line for line in lines), lines
    assert any(f"checkpoint's index (model step {saved_step})" in line for line in lines), lines

    client = MlflowClient(second.tracking_uri)
    after = lambda name: [m for m in metric_history(client, second.run_id, name) if m.timestamp >= between_ms]  # noqa: E731
    restored = after("refresh/restored_step")
    assert [m.value for m in restored] == [saved_step]
    # No index was built from the initial model: every index of the second driver came from
    # trained weights at or after the checkpoint's, numbered after the saved ones.
    built = [m.value for m in after("refresh/model_step")]
    assert built and min(built) >= saved_step, built
    used = [m for m in after("refresh/index_version_used")]
    assert [m.step for m in used] == list(range(9, 17))
    assert min(m.value for m in used) > saved_version, (used, saved_version)


def _training_store(config):
    """The training split's store as a run builds it (`build_training_data`)."""
    from pipeline.data.decoding import EncodedImageStore
    from pipeline.data.format import shard_uris
    from pipeline.data.ray_datasets import read_shards
    from pipeline.training.driver import resolve_dataset

    root, _ = resolve_dataset(config)
    return EncodedImageStore.from_dataset(read_shards(shard_uris(root, "train")).select_columns(["id", "label", "image"]))


def _refresh_actor(config, uri: str, run_id: str, resume_state=None):
    """The run's refresh actor as `start_refresh_actor` makes it, logging to `uri`."""
    import numpy as np
    import ray

    from pipeline.config import config_to_dict
    from pipeline.refresh.actor import RefreshActor

    return ray.remote(RefreshActor).options(max_concurrency=4).remote(
        config_to_dict(config), _training_store(config), np.zeros(0, np.int64), run_id, uri, resume_state
    )


def test_an_actor_that_cannot_build_its_model_fails_the_planners_instead_of_leaving_them_waiting(
    ray_local, tmp_path,
):  # fmt: skip
    """The actor builds its model in its refresh thread. A model it cannot build (weights the
    driver's node had but the actor's has not) used to end that thread without a word: the
    planners waited for a first index for ever and training hung at its first step."""
    import ray

    missing = tmp_path / "elsewhere" / "weights.pt"
    actor = _refresh_actor(_config(tmp_path, [f"model.pretrained={missing}"]), "", "")
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(actor.plan_tables.remote(0, 0, 0, True), timeout=120)
        assert "cannot refresh its index: building the model" in str(raised.value)
        assert str(missing) in str(raised.value)
    finally:
        ray.kill(actor, no_restart=True)

    # A resumed run's actor starts from the checkpoint's index: it would serve that one for the
    # whole run, never refreshed, and hold every step's weights it was sent. It fails instead.
    healthy = _refresh_actor(_config(tmp_path, []), "", "")
    try:
        assert ray.get(healthy.wait_for_index.remote(0, 120.0)) is not None
        state = ray.get(healthy.get_state.remote())
        # Checkpoints carry no centroids: only the refresh that builds an index reads them.
        assert "centroids" not in state["index"] and len(state["index"]["assignment"]) == len(state["example_loss"])
    finally:
        ray.kill(healthy, no_restart=True)
    resumed = _refresh_actor(_config(tmp_path, [f"model.pretrained={missing}"]), "", "", resume_state=state)
    try:
        deadline = time.monotonic() + 120
        while ray.get(resumed.status.remote())["error"] is None and time.monotonic() < deadline:
            time.sleep(0.5)
        ray.get(resumed.publish_weights.remote(5, [ray.put({})]))
        assert ray.get(resumed.__ray_call__.remote(lambda actor: actor.pending)) == []
        with pytest.raises(ray.exceptions.RayTaskError, match="cannot refresh its index: building the model"):
            ray.get(resumed.plan_tables.remote(0, 0, 0, False), timeout=60)
    finally:
        ray.kill(resumed, no_restart=True)


def test_the_actor_gets_the_storage_settings_the_train_workers_get(ray_local, tmp_path):
    """The driver's S3 endpoint and retries are in its own environment, which a process on
    another node does not inherit: the actor is given them as the Train workers are."""
    import os

    import numpy as np
    import ray

    from pipeline.training.driver import start_refresh_actor

    variable = "AWS_ENDPOINT_URL_S3"
    assert variable not in os.environ  # else this local Ray's actors would inherit it
    config = _config(tmp_path, [])
    data = SimpleNamespace(store=_training_store(config), holdout_ids=np.zeros(0, np.int64))
    actor = start_refresh_actor(config, "env-test", data, "", "", env_vars={variable: "http://127.0.0.1:9"})
    try:
        seen = ray.get(actor.__ray_call__.remote(lambda _: os.environ.get(variable)), timeout=120)
        assert seen == "http://127.0.0.1:9"
    finally:
        ray.kill(actor, no_restart=True)


def test_the_actor_hands_back_the_metrics_mlflow_did_not_get(ray_local, tmp_path):
    """At the end of training the driver has the actor send its queued metrics before killing
    it (`close_metrics`); what the tracking server never took is named, not lost unseen."""
    import ray
    from server_process import free_port

    # A port nothing listens on: an MLflow server that is down.
    actor = _refresh_actor(_config(tmp_path, []), f"http://127.0.0.1:{free_port()}", "run-id")
    try:
        assert ray.get(actor.wait_for_index.remote(0, 120.0))["version"] >= 1
        lines = ray.get(actor.close_metrics.remote(1.0))
        assert any(line.startswith("metric refresh/count: 1 values at steps 0") for line in lines), lines
        assert ray.get(actor.close_metrics.remote(1.0)) == []  # closed once; nothing more to send
    finally:
        ray.kill(actor, no_restart=True)


def test_a_failed_run_s_refresh_actor_sends_what_an_outage_held_before_it_is_killed(ray_local, tmp_path):
    """A run that fails (or is stopped) kills its refresh actor too: the metrics it queued while
    the tracking server was down are sent first, as at the end of a finished run."""
    import time

    import ray
    from mlflow import MlflowClient
    from server_process import MlflowServerProcess

    from pipeline.training.driver import REFRESH_METRICS_FLUSH_S, end_refresh_actor

    server = MlflowServerProcess(tmp_path)
    # The run exists in the server's store; the server itself is not up yet.
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = store.create_run(store.create_experiment("outage")).info.run_id
    actor = _refresh_actor(_config(tmp_path, []), server.uri, run_id)
    try:
        assert ray.get(actor.wait_for_index.remote(0, 120.0))["version"] >= 1
        time.sleep(1.0)  # its first send of the index's metrics fails; the next waits out a backoff
        server.start()
        printed = []
        end_refresh_actor(actor, server.uri, run_id, lambda *a, **k: printed.append(a), REFRESH_METRICS_FLUSH_S)
        assert printed == []  # nothing left unsent
        count = MlflowClient(server.uri).get_metric_history(run_id, "refresh/count")
        assert [(m.step, m.value) for m in count] == [(0, 1.0)]
        with pytest.raises(ray.exceptions.RayActorError):  # and it is gone
            ray.get(actor.status.remote(), timeout=60)
    finally:
        ray.kill(actor, no_restart=True)
        server.stop()


def test_the_actor_uses_a_gpu_only_when_ray_gave_it_one():
    """Ray leaves a node's GPUs visible to an actor that asked for none (refresh.num_gpus=0,
    the default): those GPUs are the Train workers', so the actor embeds on its CPUs."""
    from pipeline.device_feed import granted_device

    assert granted_device([], cuda_available=True).type == "cpu"
    assert granted_device(["0"], cuda_available=True).type == "cuda"
    assert granted_device(["0"], cuda_available=False).type == "cpu"


def test_the_actor_s_seed_weights_follow_every_reported_loss_across_index_swaps():
    """`record_losses` keeps per-cluster totals for the current index and `_seed_weights` reads
    them: after sub-batches with repeated ids (the last loss counts), after a new index, and
    after a restored checkpoint's losses, they must equal a full pass over every example."""
    import threading
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from pipeline.refresh.actor import RefreshActor
    from pipeline.refresh.cluster_index import build_cluster_index, cluster_seed_weights

    rng = np.random.default_rng(3)
    num = 300
    labels = rng.integers(0, 12, num)
    index, _ = build_cluster_index(rng.standard_normal((num, 8)).astype(np.float32), labels,
                                   clusters_per_class=3, num_impostors=2, version=1, model_step=0)
    actor = RefreshActor.__new__(RefreshActor)  # its bookkeeping only: no Ray, no refresh thread
    actor.__dict__.update(
        config=SimpleNamespace(loss=SimpleNamespace(magnet=SimpleNamespace(seed_floor=0.05))),
        cond=threading.Condition(), index=index, version=1, pools=False, lag=0, pending=[], latest_step=0,
        incarnation="test", example_loss=np.full(num, np.nan, dtype=np.float32), loss_stamp=0,
        _weights_cache=None, _cluster_losses=None,
    )

    def full_pass():
        return cluster_seed_weights(actor.example_loss, actor.index.assignment, actor.index.num_clusters, 0.05)

    def report(count):
        for step in range(count):
            ids = rng.integers(0, num, 40)  # repeats within a sub-batch
            losses = rng.exponential(size=40).astype(np.float32)
            actor.record_losses(step, ids, losses, index_version=actor.index.version)
            with actor.cond:
                np.testing.assert_allclose(actor._seed_weights(), full_pass(), rtol=1e-12, atol=0)
            last = {int(i): loss for i, loss in zip(ids, losses, strict=True)}
            assert all(actor.example_loss[i] == loss for i, loss in last.items())

    report(20)
    # A refresh publishes another index (other clusters for the same examples).
    actor.index = replace(index, version=2, assignment=rng.permutation(index.assignment))
    report(20)
    # A resumed run's losses replace all of them.
    actor.example_loss = rng.exponential(size=num).astype(np.float32)
    actor._cluster_losses = None  # as `_adopt` does
    actor.loss_stamp += 1
    report(5)


def test_a_split_larger_than_the_cache_is_replayed_as_far_as_it_fits_and_embeds_the_same(ray_local, tmp_path):
    """`refresh.cache_max_mb` below the decoded training split: later passes replay the first
    batches that fit and decode only the rest (before, they decoded every image again), and
    embed exactly what a pass that decodes everything embeds."""
    import numpy as np
    import torch

    from pipeline.data.decoding import PrefixCache
    from pipeline.models import build_model
    from pipeline.refresh.actor import RefreshActor

    config = _config(tmp_path, ["refresh.batch_size=16"])
    store = _training_store(config)
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    batch_bytes = 16 * 3 * config.data.image_size**2  # uint8 images

    def actor_caching(limit_bytes):
        actor = RefreshActor.__new__(RefreshActor)  # its decode and embedding only: no refresh thread
        actor.__dict__.update(config=config, store=store, num_examples=len(store), _images=PrefixCache(limit_bytes))
        starts, decode_from = [], actor._decode_from
        actor._decode_from = lambda start: starts.append(start) or decode_from(start)
        return actor, starts

    assert len(store) > 7 * 16
    uncached, uncached_starts = actor_caching(0)
    expected = uncached._embed_all(model, torch.device("cpu"))
    assert expected.shape[0] == len(store)
    actor, starts = actor_caching(5 * batch_bytes)
    for _ in range(3):
        np.testing.assert_array_equal(actor._embed_all(model, torch.device("cpu")), expected)
    assert starts == [0, 5, 5] and len(actor._images.kept) == 5
    np.testing.assert_array_equal(uncached._embed_all(model, torch.device("cpu")), expected)
    assert uncached_starts == [0, 0]
