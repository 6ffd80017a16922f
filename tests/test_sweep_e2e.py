"""A small sweep end to end: 3 trials over 2 losses with ASHA, each a 2-worker Ray Train run
on the built-in dataset, recorded in a real MLflow server, with the Tune experiment and every
checkpoint on S3 (a real moto server over HTTP). The first trial's driver is killed after its
first epoch (what losing its node does to it) and retried; the sweep is interrupted after that
trial ended, and resumed. One sweep serves every assertion here and the MLflow UI screenshot
(tests/test_mlflow_ui.py), so the suite pays for it once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "sweep-e2e"
STORAGE_PREFIX = "sweeps"
CACHE_PREFIX = "datasets"
SWEEP = """\
name: e2e
preset: local
fixed:
  data.synthetic.num_classes: 24
  data.synthetic.images_per_class: 12
  data.synthetic.image_size: 32
  data.image_size: 24
  data.eval_resize: 28
  sampler.classes_per_batch: 4
  sampler.samples_per_class: 3
  train.epochs: 2
  train.steps_per_epoch: 2
  train.log_every_steps: 2
  train.max_failures: 0
  train.checkpoints_to_keep: 4
  eval.batch_size: 64
  eval.nmi: false
  tracking.experiment: sweep-e2e
metric: test/recall@1
mode: max
search: grid
asha: {grace_period: 1, reduction_factor: 2}
space:
  optim.lr: 2e-3
losses:
  triplet:
    loss.triplet.margin: {choice: [0.1, 0.2]}
  contrastive: {}
"""

_shared: dict = {}


def _children(client, parent_run_id: str) -> dict:
    """trial id -> (run, recall@1 history) of the sweep's child runs."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    out = {}
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "test/recall_at_1"),
                         key=lambda m: (m.step, m.timestamp))
        out.setdefault(run.data.tags["sweep.trial_id"], []).append((run, history))
    return out


def _checkpoints(s3, bucket: str) -> dict[str, list[tuple[str, int]]]:
    """Each trial's Train run on S3 -> its checkpoints (folder name, step), in name order."""
    prefix = f"{STORAGE_PREFIX}/e2e/train_runs/"
    found: dict[str, list[int]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            parts = item["Key"][len(prefix):].split("/")
            if len(parts) == 3 and parts[1].startswith("checkpoint_") and parts[2] == "metrics.json":
                run, checkpoint, _ = parts
                body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                found.setdefault(run, []).append((checkpoint, json.loads(body)["step"]))
    return {run: sorted(items) for run, items in found.items()}


def _kill_trial_driver() -> int:
    """SIGKILL the one running trial's driver function (Tune's trial actor), as losing its node
    would; its Train controller and workers die with it. Returns the pid."""
    import ray
    from ray.util.state import list_actors

    drivers = list_actors(address=ray.get_runtime_context().gcs_address,  # not another Ray on this machine
                          filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")])
    assert len(drivers) == 1, drivers  # one trial at a time (see the ASHA check below)
    os.kill(drivers[0].pid, signal.SIGKILL)
    return drivers[0].pid


def run_shared_sweep(uri: str, root: Path, s3_endpoint: str) -> SimpleNamespace:
    """Run the sweep once per test session: a `jobs.sweep` process on the session's Ray
    cluster, whose first trial's driver is killed after its first epoch (Tune retries it), stopped
    with SIGINT (Ctrl+C) once that trial has ended, then resumed here."""
    if "sweep" in _shared:
        return _shared["sweep"]
    import boto3
    import ray
    from mlflow import MlflowClient

    from pipeline.sweep.runner import run_sweep
    from pipeline.sweep.space import load_sweep

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = "dml-sweep-e2e"
    s3.create_bucket(Bucket=bucket)
    space = root / "space.yaml"
    space.write_text(SWEEP)
    # The built-in dataset lives in S3 too, as it must on a cluster whose nodes share no disk.
    overrides = [f"data.cache_dir=s3://{bucket}/{CACHE_PREFIX}", f"train.storage_path=s3://{bucket}/{STORAGE_PREFIX}",
                 f"storage.s3_endpoint_url={s3_endpoint}", f"tracking.tracking_uri={uri}"]
    log_path = root / "first_run.log"
    killed = None
    with log_path.open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "jobs.sweep", str(space), *(a for o in overrides for a in ("--set", o))],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        )
        deadline = time.monotonic() + 1500  # two attempts of a trial on a loaded machine
        while "ended after epoch" not in (text := log_path.read_text()):
            if first.poll() is not None or time.monotonic() > deadline:
                first.kill()
                raise AssertionError(f"no trial ended: {text[-3000:]}")
            if killed is None and ": epoch 1 " in text:
                # The first trial reported epoch 1, so its epoch-1 checkpoint is registered.
                # (ASHA never stops the first trial: no earlier trial sets a median.)
                killed = _kill_trial_driver()
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        first_rc = first.wait(timeout=300)
    first_log = log_path.read_text()
    ended_first = [line.split()[1].rstrip(":") for line in first_log.splitlines() if "ended after epoch" in line]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`sweep.role` = 'parent'")
    before = _children(client, parent[0].info.run_id)
    checkpoints_before = _checkpoints(s3, bucket)

    lines: list[str] = []
    output = io.StringIO()
    environ = dict(os.environ)
    with contextlib.redirect_stdout(output):  # the progress lines of the resumed trials
        summary = run_sweep(load_sweep(space), overrides, resume=True, printer=lambda text, **_: lines.append(text))
    _shared["sweep"] = SimpleNamespace(
        uri=uri, root=root, spec=load_sweep(space), summary=summary, first_rc=first_rc,
        first_log=first_log, ended_first=ended_first, first_parent_id=parent[0].info.run_id,
        before=before, checkpoints_before=checkpoints_before, checkpoints_after=_checkpoints(s3, bucket),
        killed_pid=killed, resumed_output=output.getvalue() + "\n".join(lines),
        s3=s3, bucket=bucket, environ_before=environ, environ_after=dict(os.environ),
    )
    return _shared["sweep"]


@pytest.fixture(scope="session")
def swept(ray_local, mlflow_server, s3_server, tmp_path_factory):
    """The session's one sweep (see `run_shared_sweep`)."""
    return run_shared_sweep(mlflow_server, tmp_path_factory.mktemp("sweep"), s3_server)


def test_sweep_records_parent_children_and_best_model(swept, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(swept.uri)
    summary = swept.summary
    assert not summary.interrupted
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.run_name == "e2e" and parent.info.status == "FINISHED"
    params = parent.data.params
    assert params["sweep.search"] == "grid" and params["sweep.metric"] == "test/recall@1"
    assert params["losses.triplet.loss.triplet.margin"] == "choice(0.1, 0.2)"
    assert params["space.optim.lr"] == "0.002" and params["base.train.epochs"] == "2"
    space_file = client.download_artifacts(summary.parent_run_id, "sweep/space.yaml", str(tmp_path))
    assert Path(space_file).read_text() == SWEEP
    assert {a.path for a in client.list_artifacts(summary.parent_run_id, "summary")} == {
        "summary/trials.csv", "summary/trials.md", "summary/metric_vs_params.png"}

    # One nested child run per trial: the trial's own training run, with its full config.
    children = _children(client, summary.parent_run_id)
    assert len(children) == 3 and all(len(runs) == 1 for runs in children.values())
    records = {r.trial_id: r for r in summary.trials}
    assert set(records) == set(children)
    losses = sorted((r.loss, r.settings.get("loss.triplet.margin")) for r in records.values())
    assert losses == [("contrastive", None), ("triplet", 0.1), ("triplet", 0.2)]
    for trial_id, [(run, history)] in children.items():
        record = records[trial_id]
        assert run.info.run_name == f"{record.loss}-{trial_id}" == record.run_name
        assert run.data.params["loss.name"] == record.loss
        # Every trial read the sweep's one copy of the built-in dataset in S3 (an s3:// cache
        # dir once reached trials as a local folder named 's3:').
        assert run.data.tags["dataset.root"].startswith(f"s3://{swept.bucket}/{CACHE_PREFIX}/synthetic-")
        assert run.data.params["train.num_workers"] == "2" and run.data.params["optim.lr"] == "0.002"
        if record.loss == "triplet":
            assert float(run.data.params["loss.triplet.margin"]) == record.settings["loss.triplet.margin"]
        assert run.data.tags["sweep.status"] == record.status
        # Every epoch reached MLflow and, relayed by the trial's driver function, Tune/ASHA.
        # (A trial resumed from a checkpoint logs again the steps after it: the last value wins.)
        by_step = {m.step: m.value for m in history}
        assert len(record.history) == record.epochs_done >= 1
        assert sorted(by_step)[: record.epochs_done] == [2, 4][: record.epochs_done]
        if run.info.run_name != swept.ended_first[0]:
            # (The retried trial is left out: MLflow keeps the first value logged at a step,
            # and its killed attempt may have evaluated epoch 2 before it died; see
            # test_a_trial_whose_driver_died_is_retried_from_its_checkpoint.)
            assert by_step[2 * record.epochs_done] == pytest.approx(record.metric)
        if record.status == "completed":
            assert record.epochs_done == 2 and run.info.status == "FINISHED"
        else:  # ASHA stopped it at its rung (epoch 1)
            assert record.status == "stopped early" and record.epochs_done == 1
            assert run.info.status == "KILLED"
    # ASHA (reduction factor 2, one trial at a time, in trial order) stops a trial whose epoch-1
    # metric is below the median of the earlier trials' at that rung, across the resume too:
    # the rungs are rebuilt from the restored trials' saved results.
    earlier: list[float] = []
    for record in sorted(records.values(), key=lambda r: r.trial_id):
        first = record.history[0]
        expected = "stopped early" if earlier and first < float(np.percentile(earlier, 50)) else "completed"
        assert record.status == expected, (record, earlier)
        earlier.append(first)

    # The best completed trial: on the parent, and its model registered from its model/ artifact.
    best = max((r for r in records.values() if r.status == "completed"), key=lambda r: r.metric)
    assert summary.best.trial_id == best.trial_id
    assert parent.data.metrics["best/test/recall_at_1"] == pytest.approx(best.metric)
    assert parent.data.tags["sweep.best_run_id"] == best.run_id
    version = client.get_model_version("e2e-best", summary.registered_version)
    assert version.run_id == best.run_id and version.source.endswith("/model")
    assert "model/model.pt" in {a.path for a in client.list_artifacts(best.run_id, "model")}
    table = client.download_artifacts(summary.parent_run_id, "summary/trials.csv", str(tmp_path))
    rows = Path(table).read_text().splitlines()
    assert rows[0].startswith("run,loss,status,epochs,test/recall@1,")
    top = max(records.values(), key=lambda r: r.metric)  # best first, stopped trials included
    assert len(rows) == 4 and rows[1].startswith(f"{top.run_name},{top.loss},{top.status},")


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(swept):
    from mlflow import MlflowClient

    # The first process was stopped with Ctrl+C after its first trial ended...
    assert swept.first_rc == 130, swept.first_log[-3000:]
    assert "--resume" in swept.first_log
    assert len(swept.ended_first) >= 1
    # ...and the resumed sweep reopened the same parent run and finished the other trials.
    assert swept.summary.parent_run_id == swept.first_parent_id
    after = _children(MlflowClient(swept.uri), swept.summary.parent_run_id)
    assert len(after) == 3
    ended_ids = {name.split("-", 1)[1] for name in swept.ended_first}
    for trial_id, [(run, history)] in after.items():
        if trial_id not in ended_ids:
            continue
        # A trial that had ended is not run again: same MLflow run, untouched, no new checkpoint.
        [(run_before, history_before)] = swept.before[trial_id]
        assert run.info.run_id == run_before.info.run_id
        assert run.info.end_time == run_before.info.end_time
        assert [(m.step, m.value, m.timestamp) for m in history] == [
            (m.step, m.value, m.timestamp) for m in history_before]
        name = run.info.run_name
        assert swept.checkpoints_after[name] == swept.checkpoints_before[name]
        assert f"trial {name}: epoch" not in swept.resumed_output
    # Its result was reused: the resumed sweep's summary holds it, with the metric the first
    # process printed for its last epoch (Tune's, not MLflow's: see the retry test).
    records = {r.trial_id: r for r in swept.summary.trials}
    for name in swept.ended_first:
        last = [line for line in swept.first_log.splitlines() if line.startswith(f"trial {name}: epoch ")][-1]
        assert records[name.split("-", 1)[1]].metric == pytest.approx(float(last.split()[-1]), abs=5e-5)
    assert any(f"trial {r.run_name}: epoch" in swept.resumed_output for r in records.values()
               if r.trial_id not in ended_ids)
    # run_sweep exported the moto endpoint only while it ran: this process's S3 variables are
    # back as they were, so the S3 tests after this one do not inherit them.
    from pipeline.storage import WORKER_ENV

    assert {n: swept.environ_after.get(n) for n in WORKER_ENV} == {
        n: swept.environ_before.get(n) for n in WORKER_ENV}


def test_a_trial_whose_driver_died_is_retried_from_its_checkpoint(swept, metric_history):
    from mlflow import MlflowClient

    # The first trial's driver was killed after epoch 1 (what losing its node does to it)...
    assert swept.killed_pid is not None
    first = swept.ended_first[0]
    retried = [line for line in swept.first_log.splitlines() if "failed, retrying" in line]
    assert retried == [f"trial {first}: attempt 1 failed, retrying from its last checkpoint"], swept.first_log[-3000:]
    # ...and Tune's retry resumed its Train run from a checkpoint and finished it: step 2's
    # checkpoint was not written again, as a retry from scratch would (four are kept, so it
    # would show). The killed attempt may have got as far as writing step 4's before it died.
    steps = [step for _, step in swept.checkpoints_after[first]]
    assert steps.count(2) == 1 and steps[-1] == 4 and set(steps) == {2, 4}, steps
    record = next(r for r in swept.summary.trials if r.run_name == first)
    assert (record.status, record.epochs_done) == ("completed", 2)
    # One MLflow run for both attempts, every step once.
    client = MlflowClient(swept.uri)
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED"
    for name, steps in (("train/loss", [2, 4]), ("test/recall_at_1", [2, 4])):
        assert [m.step for m in metric_history(client, record.run_id, name)] == steps, name
    # The Tune experiment itself lives on S3 beside the checkpoints.
    keys = [o["Key"] for o in swept.s3.list_objects_v2(Bucket=swept.bucket, Prefix=f"{STORAGE_PREFIX}/e2e/")["Contents"]]
    assert any(key.rsplit("/", 1)[-1].startswith("experiment_state") for key in keys), keys
