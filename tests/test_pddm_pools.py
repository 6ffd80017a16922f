"""PDDM end to end on Ray: 2 workers, batches with hard-negative pools that the refresh actor
rebuilds from the full training set while training runs, the run in MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.ray

TINY = [
    "data.synthetic.num_classes=24",
    "data.synthetic.images_per_class=16",
    "data.synthetic.image_size=32",
    "data.image_size=24",
    "data.eval_resize=28",
    "sampler.classes_per_batch=4",
    "sampler.samples_per_class=3",
    "sampler.pool_size=8",
    "sampler.pool_draws_per_class=2",
    "train.epochs=2",
    "train.steps_per_epoch=8",
    "train.log_every_steps=1",
    "train.max_failures=0",
    "refresh.every_steps=3",
    "data.prefetch_batches=2",
    "refresh.max_plan_ahead_steps=4",
    "eval.batch_size=64",
]




@pytest.mark.parametrize(
    "search",
    [
        [],  # the exact search
        # An approximate one: one IVF list of 4 searched, its short pools refilled exactly;
        # and lagged planning (the pools of the last refresh at least 5 steps back).
        ["refresh.pool_index=IVF4,Flat", "refresh.pool_search_params=nprobe=1", "refresh.lag_steps=5"],
    ],
    ids=["exact", "ivf-lagged"],
)
def test_pddm_trains_on_refreshed_hard_pools(ray_local, tmp_path, metric_history, search):
    from mlflow import MlflowClient

    from pipeline.training.checkpoint import load_training_state
    from pipeline.training.driver import run_training
    from pipeline.training.refresh_link import read_refresh_state

    config = load_config(
        "pddm", TINY + search + [f"data.cache_dir={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}"]
    )
    summary = run_training(config, printer=lambda *a, **k: None)
    client = MlflowClient(summary.tracking_uri)
    run_id = summary.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert summary.metrics["step"] == 16 and 0.0 <= summary.metrics["test/recall@1"] <= 1.0
    params = client.get_run(run_id).data.params
    assert params["sampler.name"] == "hard_pools"
    assert params["refresh.pool_index"] == config.refresh.pool_index

    # The initial pools plus refreshes from trained weights, each timed; batches moved on to
    # newer pools as they appeared.
    assert metric_history(client, run_id, "refresh/count")[-1].value >= 3
    knn_seconds = metric_history(client, run_id, "refresh/knn_seconds")
    assert knn_seconds and all(m.value >= 0 for m in knn_seconds)
    assert metric_history(client, run_id, "refresh/pool_distance_mean")
    assert max(m.step for m in metric_history(client, run_id, "refresh/model_step")) > 0
    used = [m.value for m in metric_history(client, run_id, "refresh/index_version_used")]
    assert len(used) == 16 and used[-1] > used[0], used
    if config.refresh.lag_steps:
        # Lagged: every step used the pools of exactly the step lagged_source_step names
        # (two such runs end bit-identical: tests/test_lagged_planning.py, for Magnet).
        from pipeline.data.actor_tables import lagged_source_step

        staleness = {int(m.step) - 1: m.value for m in metric_history(client, run_id, "refresh/staleness_steps")}
        assert staleness == {s: s - lagged_source_step(s, 5, 3) for s in range(16)}, staleness
    # PDDM mined quadruplets from those batches and trained its unit.
    assert metric_history(client, run_id, "train/loss")

    # The checkpoint holds the PDDM unit (a learned loss parameter) and the pools: 12 training
    # classes, each with 8 other-class examples.
    checkpoint = Path(summary.checkpoint_path)
    learner = load_training_state(str(checkpoint))["learner"]
    assert any(key.startswith("loss.unit.") for key in learner), list(learner)
    state = read_refresh_state(checkpoint / "refresh_state.npz")
    index = state["index"]
    assert len(index["classes"]) == 12 and np.all(np.diff(index["offsets"]) == 8)
    assert state["step"] == 16
