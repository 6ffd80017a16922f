"""A tracking server that goes away: nothing blocks, nothing raises, everything is retried
(with backoff, for a bounded time), and what never arrived is named at the end.

The server here is a real `mlflow server` process that the test stops and starts again on
the same port and store (the shared `mlflow_server` fixture must stay up for other tests).
"""

from __future__ import annotations

import time

import pytest
from server_process import MlflowServerProcess, free_port

from pipeline.sweep.records import TrialRecord, register_best
from pipeline.tracking import (
    MetricsLogger,
    UnloggedMetrics,
    finish_run,
    load_unlogged,
    save_unlogged,
)


@pytest.fixture
def server(tmp_path):
    process = MlflowServerProcess(tmp_path)
    process.start()
    yield process
    process.stop()


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_unlogged_metrics_survive_a_checkpoint_and_say_what_they_are(tmp_path):
    from mlflow.entities import Metric

    held = [Metric("train/loss", 0.5, 1000 + s, s) for s in (2, 4, 6, 8, 10)] + [
        Metric("test/nmi", 0.1, 7, 4)
    ]
    unlogged = UnloggedMetrics(held, {"train/lr": [3, 12, 16]}, "ConnectionError: refused")
    save_unlogged(str(tmp_path), unlogged)
    back = load_unlogged(str(tmp_path))
    assert [(m.key, m.value, m.timestamp, m.step) for m in back.held] == [
        (m.key, m.value, m.timestamp, m.step) for m in held
    ]
    assert back.dropped == unlogged.dropped and back.error == unlogged.error
    assert back.describe() == [
        "metric test/nmi: 1 values at steps 4 (held)",
        "metric train/loss: 5 values at steps 2..10 (held)",
        "metric train/lr: 3 values at steps 12..16 (dropped: the buffer was full)",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_unlogged(str(empty), UnloggedMetrics())
    assert not any(empty.iterdir()) and not load_unlogged(str(empty))


def test_an_unreachable_server_never_blocks_or_raises_and_the_buffer_is_bounded():
    # Nothing listens on this port: every send is refused.
    logger = MetricsLogger(
        f"http://127.0.0.1:{free_port()}",
        "0" * 32,
        max_buffered=6,
        first_backoff_s=0.05,
        max_backoff_s=0.2,
    )
    for step in range(1, 5):
        logger.log({"train/loss": 1.0 / step, "train/lr@x": 0.1}, step)
    _wait_for(lambda: logger.failures >= 1)
    unlogged = logger.close(timeout_s=0.5)
    assert "ConnectionError" in unlogged.error or "Connection" in unlogged.error, unlogged.error
    assert [(m.key, m.step) for m in unlogged.held] == [
        ("train/loss", 1),
        ("train/lr_at_x", 1),
        ("train/loss", 2),
        ("train/lr_at_x", 2),
        ("train/loss", 3),
        ("train/lr_at_x", 3),
    ]
    assert unlogged.dropped == {"train/loss": [1, 4, 4], "train/lr_at_x": [1, 4, 4]}
    with pytest.raises(RuntimeError, match="closed"):
        logger.log({"train/loss": 0.0}, 5)


def test_what_rank_0_held_at_a_checkpoint_reaches_the_server_from_the_next_attempt(
    server, tmp_path, metric_history
):
    # Rank 0 saves what it holds with each checkpoint; if its process dies during an outage, the
    # restarted worker group resumes from that checkpoint and does not train those steps again.
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("carried")).info.run_id
    logger = MetricsLogger(server.uri, run_id, first_backoff_s=0.2, max_backoff_s=1.0, max_buffered=3)
    logger.log({"train/loss": 1.0}, 1)
    _wait_for(lambda: logger.pending == 0)
    delivered = client.get_metric_history(run_id, "train/loss")
    server.stop()
    logger.log({"train/loss": 0.5, "train/lr": 0.1}, 2)
    logger.log({"train/loss": 0.25, "train/lr": 0.1}, 3)  # the buffer holds 3: one value dropped
    _wait_for(lambda: logger.failures >= 1)
    checkpointed = logger.held()
    logger.log({"train/loss": 0.125}, 4)  # after the checkpoint: trained and logged again later
    assert checkpointed.describe() == [
        "metric train/loss: 2 values at steps 2, 3 (held)",
        "metric train/lr: 1 values at steps 2 (held)",
        "metric train/lr: 1 values at steps 3..3 (dropped: the buffer was full)",
    ]
    save_unlogged(str(tmp_path), checkpointed)
    # The process dies here, with its queue. The next attempt starts while the server is back.
    server.start()
    carried = load_unlogged(str(tmp_path))
    carried.held += delivered  # a value that did arrive, sent again: MLflow keeps it once
    again = MetricsLogger(server.uri, run_id)
    again.carry_over(carried)
    again.log({"train/loss": 0.125}, 4)
    left = again.close(timeout_s=60)
    assert left.describe() == ["metric train/lr: 1 values at steps 3..3 (dropped: the buffer was full)"]
    assert [(m.step, m.value) for m in metric_history(client, run_id, "train/loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.25), (4, 0.125)
    ]
    logger.close(timeout_s=0)


def test_metrics_logged_while_the_server_is_down_arrive_after_it_restarts(
    server, tmp_path, metric_history
):
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    logger = MetricsLogger(server.uri, run_id, first_backoff_s=0.2, max_backoff_s=1.0)
    logger.log({"train/loss": 1.0}, 1)
    _wait_for(lambda: logger.pending == 0)

    server.stop()
    for step in range(2, 6):  # training goes on: log() returns at once, nothing raises
        logger.log({"train/loss": 1.0 / step, "test/recall@1": step / 10}, step)
    _wait_for(lambda: logger.failures >= 2)  # it did try, and failed, more than once
    assert logger.pending == 8

    # Still down when a run ends: rank 0 hands over what it holds, and the driver retries for
    # a bounded time, then says what is missing (metrics, artifacts, the run's status).
    last = MetricsLogger(server.uri, run_id, first_backoff_s=0.2, max_backoff_s=1.0)
    last.log({"train/loss": 0.1}, 6)
    last.log({"train/loss": 0.05}, 7)
    held = last.close(timeout_s=1)
    assert held.describe() == ["metric train/loss: 2 values at steps 6, 7 (held)"]
    model_dir, plot_dir = tmp_path / "checkpoint", tmp_path / "plots"
    model_dir.mkdir()
    plot_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    (plot_dir / "recall_at_k.png").write_bytes(b"png")
    missing = finish_run(
        server.uri,
        run_id,
        str(model_dir),
        failed=False,
        artifacts={"plots": str(plot_dir)},
        retry_s=1,
    )
    assert [line.split(":")[0] for line in missing] == [
        f"artifacts model/ (from {model_dir})",
        f"artifacts plots/ (from {plot_dir})",
        "run status FINISHED (the run still shows RUNNING)",
    ], missing

    server.start()  # same port, same store
    # An upload cut short leaves part of model/ listed; such a model is not registered.
    client.log_artifact(run_id, str(model_dir / "model.pt"), "model")
    record = TrialRecord(trial_id="t0", loss="triplet", settings={}, epochs_done=2, epochs=2,
                         metric=0.5, status="completed", run_id=run_id, run_name="trial-0")
    assert register_best(client, record, "outage-best") is None
    unlogged = logger.close(timeout_s=60)
    assert not unlogged, unlogged.describe()
    resender = MetricsLogger(server.uri, run_id)
    resender.resend(held.held)
    assert not resender.close(timeout_s=60)
    assert (
        finish_run(
            server.uri, run_id, str(model_dir), failed=False, artifacts={"plots": str(plot_dir)}
        )
        == []
    )

    assert [m.step for m in metric_history(client, run_id, "train/loss")] == [1, 2, 3, 4, 5, 6, 7]
    assert [m.value for m in metric_history(client, run_id, "test/recall_at_1")] == [
        0.2,
        0.3,
        0.4,
        0.5,
    ]
    assert client.get_run(run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert artifacts == {"model/model.pt", "plots/recall_at_k.png"}
    assert register_best(client, record, "outage-best") == "1"  # now wholly logged
    assert register_best(client, record, "outage-best") == "1"  # again: its existing version


def test_rank_zero_logs_no_step_its_mlflow_run_already_has(tmp_path, metric_history):
    """An attempt stopped before its first checkpoint logged steps 1 and 2; the rerun trains
    them again from step 0 into the same MLflow run, which keeps one value per step."""
    from mlflow import MlflowClient

    from pipeline.training.loop import _NewStepsOnly

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("rerun")).info.run_id
    first = MetricsLogger(uri, run_id)
    first.log({"train/loss": 1.0, "test/recall@1": 0.1}, 1)
    first.log({"train/loss": 0.9}, 2)
    assert first.close().describe() == []

    rerun = _NewStepsOnly(MetricsLogger(uri, run_id))
    for step in (1, 2, 3):
        rerun.log({"train/loss": 10.0 * step, "test/recall@1": 0.5 * step}, step)
    assert rerun.close().describe() == []
    values = {name: [(m.step, m.value) for m in metric_history(client, run_id, name)]
              for name in ("train/loss", "test/recall_at_1")}
    assert values == {"train/loss": [(1, 1.0), (2, 0.9), (3, 30.0)],
                      "test/recall_at_1": [(1, 0.1), (2, 1.0), (3, 1.5)]}
