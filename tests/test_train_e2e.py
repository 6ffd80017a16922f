"""One real distributed run on Ray (2 workers, the built-in dataset) and its MLflow record."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.train.v2._internal.constants import (
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
    VALIDATE_STORAGE_MARKER_FILENAME,
)
from short_runs import SHORT_RUN, TINY_BUILT_IN

from pipeline.config import load_config
from pipeline.data.synthetic import SyntheticSpec, generate_synthetic
from pipeline.training.checkpoint import (
    RUN_FILE,
    CheckpointRecordUnreadable,
    load_embedding_model,
    registered_checkpoint,
)

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent

TINY = TINY_BUILT_IN + SHORT_RUN


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    """(config, summary, printed lines) of one triplet run of 2 epochs x 4 steps."""
    from pipeline.training.driver import run_training

    root = tmp_path_factory.mktemp("finished_run")
    config = load_config(
        "local",
        TINY + [f"data.cache_dir={root / 'data'}", f"train.storage_path={root / 'runs'}"],
    )
    lines: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    summary = run_training(config, printer=lambda text, **_: lines.append(text))
    # Ray Train installs its own Ctrl+C handler in fit(): the driver puts this one back.
    assert signal.getsignal(signal.SIGINT) is before
    return config, summary, lines


def test_training_run_is_recorded_in_mlflow(finished_run, tmp_path):
    from mlflow import MlflowClient

    config, summary, lines = finished_run

    # The driver printed readable progress from rank 0 and per-epoch evaluation.
    assert any("step      8/8" in line for line in lines), lines
    assert sum(" eval " in line for line in lines) == 2, lines
    assert 0.0 <= summary.metrics["test/recall@1"] <= 1.0

    client = MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.name"] == "triplet"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["dataset.fingerprint"]
    assert run.data.tags["git_commit"]
    recall = client.get_metric_history(summary.run_id, "test/recall_at_1")
    assert [m.step for m in recall] == [4, 8], "one evaluation per epoch"
    for name in ("test/map_at_r", "test/r_precision", "test/nmi", "train/loss", "train/lr",
                 "train/images_per_s"):
        assert client.get_metric_history(summary.run_id, name), name
    assert len(client.get_metric_history(summary.run_id, "train/loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {"config.yaml", "model"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(summary.run_id, "model")}
    assert {"model/model.pt", "model/state.pt", "model/config.yaml"} <= model_files

    # Plots of the final evaluation (PNG under plots/), made by the driver from the test
    # embeddings rank 0 saved in the last checkpoint; the tracking store got everything.
    from PIL import Image

    from pipeline.evaluation.metrics import retrieval_metrics
    from pipeline.reporting.run_report import PLOT_FILES
    from pipeline.reporting.test_embeddings import load_test_embeddings

    assert summary.not_logged == ()
    plot_files = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    assert plot_files == {f"plots/{name}" for name in PLOT_FILES}
    for name in PLOT_FILES:
        png = Image.open(client.download_artifacts(summary.run_id, f"plots/{name}", str(tmp_path)))
        assert png.format == "PNG" and min(png.size) > 100, name
    final = load_test_embeddings(summary.checkpoint_path)
    assert len(final.ids) == 12 * 12 and sorted(final.ids) == list(range(144))
    again = retrieval_metrics(final.embeddings, final.labels, ks=(1,), compute_nmi=False)
    assert again["recall@1"] == pytest.approx(summary.metrics["test/recall@1"])

    # The final checkpoint rebuilds the model (weights_only) and embeds images.
    from pipeline.evaluation.protocol import resolve_evaluation
    from pipeline.training.driver import resolve_dataset

    model, saved_config = load_embedding_model(summary.checkpoint_path)
    # The config as run: what was left to the dataset is resolved (the built-in one records
    # no protocol: Recall@1/2/4/8 on 'test').
    assert saved_config == resolve_evaluation(config, resolve_dataset(config)[1])
    assert (saved_config.eval.recall_ks, saved_config.data.test_split) == ([1, 2, 4, 8], "test")
    with torch.no_grad():
        out = model(torch.rand(2, 3, 24, 24))
    assert out.shape == (2, config.model.embedding_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_ray_trains_record_names_the_checkpoint_to_resume_and_serve(finished_run, tmp_path):
    """Ray Train's record of a run (read on a copy of the run folder: it names checkpoints
    relative to it) is what a rerun resumes from and what evaluate/export use for a run."""
    from pipeline.serving.checkpoints import CheckpointNotFound, locate_checkpoint
    from pipeline.training.checkpoint import METRICS_FILE, MODEL_FILE, latest_checkpoint

    _, summary, _ = finished_run
    final = Path(summary.checkpoint_path).name
    run_folder = tmp_path / "runs" / Path(summary.checkpoint_path).parent.name
    shutil.copytree(Path(summary.checkpoint_path).parent, run_folder)
    storage, name = str(run_folder.parent), run_folder.name
    found = registered_checkpoint(storage, name)
    assert (Path(found[1]).name, found[2]) == (final, 8)

    # A job still writing a newer checkpoint: its metrics.json is there, model.pt half copied.
    # A listing takes it; evaluate and export take the record's, whole, checkpoint.
    writing = run_folder / "checkpoint_2099-01-01_00-00-00.000000"
    writing.mkdir()
    (writing / METRICS_FILE).write_text(json.dumps({"step": 12, "epoch": 3}))
    (writing / MODEL_FILE).write_bytes((run_folder / final / MODEL_FILE).read_bytes()[:100])
    assert latest_checkpoint(storage, name)[1] == str(writing)
    assert locate_checkpoint(name, storage)[1] == str(run_folder / final)
    assert locate_checkpoint(str(run_folder), "unused")[1] == str(run_folder / final)

    # A job rewrites that record in place after every report; a reader can find it empty (the
    # CI failure of a test that polls a running job). The read is retried until it is whole...
    snapshot = run_folder / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    written = snapshot.read_bytes()
    snapshot.write_bytes(b"")
    rewrite = threading.Timer(0.8, snapshot.write_bytes, args=(written,))
    rewrite.start()
    try:
        assert registered_checkpoint(storage, name, attempts=10, retry_seconds=0.2)[2] == 8
    finally:
        rewrite.join()
    # ... and a record that stays unreadable is an error that names it, not "no checkpoint".
    snapshot.write_bytes(written[: len(written) // 2])
    with pytest.raises(CheckpointRecordUnreadable, match=f"{re.escape(str(snapshot))}: .* could not be read in 2 tries"):
        registered_checkpoint(storage, name, attempts=2, retry_seconds=0.01)
    # Evaluate and export then list the folder (a record from another Ray version, say).
    assert locate_checkpoint(name, storage)[1] == str(run_folder / final)

    # A record that names no checkpoint yet (the first report is still being uploaded): a
    # run name finds nothing, rather than the half-written directory.
    record = json.loads(written)
    record.update({key: [] for key, value in record.items() if isinstance(value, list)},
                  latest_checkpoint_result=None)
    snapshot.write_text(json.dumps(record))
    assert registered_checkpoint(storage, name) is None
    with pytest.raises(CheckpointNotFound, match="no run of that name has a checkpoint"):
        locate_checkpoint(name, storage)
    # Before its first registration Ray Train writes no record at all; its storage marker says
    # the folder is its own, so the half-written directory is still not taken.
    snapshot.unlink()
    with pytest.raises(CheckpointNotFound, match="no run of that name has a checkpoint"):
        locate_checkpoint(name, storage)
    # A folder Ray Train did not make (checkpoints copied on their own) is listed, and only
    # a checkpoint that holds its weights and config is taken.
    (run_folder / VALIDATE_STORAGE_MARKER_FILENAME).unlink()
    assert locate_checkpoint(name, storage)[1] == str(run_folder / final)


def test_a_run_name_reused_with_other_settings_is_refused_before_ray(finished_run, tmp_path, ray_must_not_start):
    """`train.run_name` names the run folder Ray Train resumes: reused with another loss, the
    run's triplet weights and MLflow record would go on under a contrastive loss."""
    from pipeline.training.driver import RunRefused, resolve_dataset, run_training

    config, summary, _ = finished_run
    shutil.copytree(Path(summary.checkpoint_path).parent, tmp_path / "runs" / "exp1")
    settings = TINY + [f"data.cache_dir={config.data.cache_dir}", f"train.storage_path={tmp_path / 'runs'}",
                       "train.run_name=exp1"]
    changed = load_config("local", settings + ["loss.name=contrastive", "model.embedding_dim=32"])
    with pytest.raises(RunRefused) as refused:
        run_training(changed, printer=lambda *a, **k: None)
    assert str(refused.value).startswith("train.run_name: run 'exp1' has a checkpoint at step 8 (")
    assert ("trained with other settings, and a rerun would resume it: loss.name: 'triplet' -> "
            "'contrastive'; model.embedding_dim: 64 -> 32. Choose another train.run_name") in str(refused.value)
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # no MLflow run was created

    # More epochs (a run trained longer) and settings that change where and how fast it runs,
    # not what it learns, resume (here as far as Ray, which the fixture refuses).
    same = load_config("local", settings + ["train.epochs=3", "train.log_every_steps=1", "data.decode_cpus=0.25"])
    with pytest.raises(AssertionError, match="reached for Ray"):
        run_training(same, printer=lambda *a, **k: None)

    # The checkpoint keeps the fingerprint of the images it was trained on: a copy of them at
    # another data.root resumes; other images there do not, though every setting is the same.
    built_in, metadata = resolve_dataset(config)
    checkpoint = Path(summary.checkpoint_path)
    assert json.loads((checkpoint / RUN_FILE).read_text()) == {
        "run_name": summary.run_name, "run_id": summary.run_id, "dataset_fingerprint": metadata.fingerprint}
    shutil.copytree(built_in, tmp_path / "moved")
    moved = load_config("local", settings + [f"data.root={tmp_path / 'moved'}"])
    with pytest.raises(AssertionError, match="reached for Ray"):
        run_training(moved, printer=lambda *a, **k: None)
    spec = SyntheticSpec(**{**vars(config.data.synthetic), "seed": config.data.synthetic.seed + 1})
    generate_synthetic(tmp_path / "other", spec)
    other = load_config("local", settings + [f"data.root={tmp_path / 'other'}"])
    with pytest.raises(RunRefused) as refused:
        run_training(other, printer=lambda *a, **k: None)
    assert f"data.root: '' -> '{tmp_path / 'other'}'; the dataset's fingerprint: {metadata.fingerprint[:12]}..." in str(refused.value)

    # The resumes above reached MLflow: the run says what the last one changed, since its
    # params are the first attempt's (this run folder was copied from another storage path).
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipeline import tracking

    client = MlflowClient(tracking.tracking_uri(same))
    run_id = tracking.recorded_run(same, "exp1").run_id
    assert client.get_run(run_id).data.tags["pipeline.resumed_at_step_8"] == (
        f"data.root: '' -> '{tmp_path / 'moved'}'; train.run_name: '' -> 'exp1'; "
        f"train.storage_path: '{config.train.storage_path}' -> '{tmp_path / 'runs'}'")
    # A stopped attempt logged steps past the checkpoint (step 8) under its schedule: a resume
    # with other epochs would leave them in the record, so it is refused; the same epochs resume.
    client.log_batch(run_id, metrics=[Metric("train/loss", 0.3, 0, step) for step in (10, 12)])
    with pytest.raises(RunRefused, match=r"^train.epochs: run 'exp1' resumes from its checkpoint at step 8, but "
                       r"its MLflow record holds steps up to 12, logged under train.epochs=2 after that"):
        run_training(same, printer=lambda *a, **k: None)
    with pytest.raises(AssertionError, match="reached for Ray"):
        run_training(load_config("local", settings), printer=lambda *a, **k: None)


def test_a_run_another_job_trained_while_this_one_started_is_refused(
    finished_run, tmp_path, monkeypatch, ray_must_not_start,
):  # fmt: skip
    """The checks of a rerun read the run's checkpoint before its lock is taken; a job of the
    same run that ended in between (here: its run folder appears as the lock is taken) left
    them stale, and this job would start from step 0 over its checkpoints."""
    import contextlib

    from pipeline.training import driver
    from pipeline.training.driver import RunRefused, run_training

    config, summary, _ = finished_run
    settings = TINY + [f"data.cache_dir={config.data.cache_dir}", f"train.storage_path={tmp_path / 'runs'}",
                       "train.run_name=raced"]
    real_lock = driver.run_lock

    @contextlib.contextmanager
    def lock_after_another_job(storage_path, name):
        shutil.copytree(Path(summary.checkpoint_path).parent, Path(storage_path) / name)
        with real_lock(storage_path, name):
            yield

    monkeypatch.setattr(driver, "run_lock", lock_after_another_job)
    with pytest.raises(RunRefused, match=r"^train.run_name: run 'raced' was trained by another job while this one "
                                         r"started; run the command again$"):
        run_training(load_config("local", settings), printer=lambda *a, **k: None)
    monkeypatch.setattr(driver, "run_lock", real_lock)
    with pytest.raises(AssertionError, match="reached for Ray"):  # run again, it resumes that checkpoint
        run_training(load_config("local", settings), printer=lambda *a, **k: None)


def test_a_rerun_removes_the_checkpoints_ray_trains_record_does_not_hold(
    finished_run, tmp_path, ray_must_not_start,
):  # fmt: skip
    """A job stopped between a checkpoint's upload and its registration leaves it in the run
    folder, where nothing would ever resume from it or remove it (`checkpoints_to_keep` counts
    registered ones). The next job of the run removes it; the registered ones stay."""
    from pipeline.training.driver import run_training

    config, summary, _ = finished_run
    run_folder = tmp_path / "runs" / "kept"
    shutil.copytree(Path(summary.checkpoint_path).parent, run_folder)
    registered = sorted(p.name for p in run_folder.glob("checkpoint_*"))
    for name in ("checkpoint_2099-01-01_00-00-00.000000", "checkpoint_2099-01-01_00-00-01.000000"):
        shutil.copytree(summary.checkpoint_path, run_folder / name)
    settings = TINY + [f"data.cache_dir={config.data.cache_dir}", f"train.storage_path={tmp_path / 'runs'}",
                       "train.run_name=kept"]
    printed = []
    with pytest.raises(AssertionError, match="reached for Ray"):
        run_training(load_config("local", settings), printer=lambda *a, **k: printed.append(" ".join(a)))
    assert sorted(p.name for p in run_folder.glob("checkpoint_*")) == registered
    assert ("run kept: removed 2 checkpoint(s) that Ray Train's record does not hold (left by a stopped job): "
            "checkpoint_2099-01-01_00-00-00.000000, checkpoint_2099-01-01_00-00-01.000000") in printed


def test_softtriple_run_trains_and_checkpoints_its_centers(ray_local, tmp_path, metric_history):
    """Also the seen-class hold-out of a loss other than Magnet's: its kNN accuracy per epoch."""
    from mlflow import MlflowClient

    from pipeline.training.checkpoint import load_training_state
    from pipeline.training.driver import run_training

    config = load_config(
        "local",
        TINY + ["loss.name=softtriple", "loss.softtriple.centers_per_class=3", "data.seen_holdout_fraction=0.25",
                f"data.cache_dir={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}"],
    )
    summary = run_training(config, printer=lambda *a, **k: None)
    client = MlflowClient(summary.tracking_uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    assert client.get_run(summary.run_id).data.params["loss.name"] == "softtriple"
    assert [m.step for m in client.get_metric_history(summary.run_id, "test/recall_at_1")] == [4, 8]

    # The seen-class kNN accuracy at every evaluation; the last one is what the final weights
    # give when the held-out quarter of each training class is classified by its nearest
    # neighbour among the rest (recomputed here, outside Ray, from the checkpoint).
    seen = metric_history(client, summary.run_id, "seen/knn_accuracy")
    assert [m.step for m in seen] == [4, 8]
    from pipeline.data.decoding import decode_eval_batch
    from pipeline.data.format import read_split
    from pipeline.data.planning import seen_holdout_ids
    from pipeline.evaluation.metrics import knn_accuracy
    from pipeline.training.driver import resolve_dataset

    model, _ = load_embedding_model(summary.checkpoint_path)
    train = read_split(resolve_dataset(config)[0], "train", ["id", "label", "image"]).to_pydict()
    decoded = decode_eval_batch({"image": train["image"], "label": np.array(train["label"]), "id": np.array(train["id"])},
                                image_size=config.data.image_size, resize=config.data.eval_resize)
    ids, labels = decoded["id"], decoded["label"]
    with torch.no_grad():
        embedded = model(torch.from_numpy(decoded["image"]).float() / 255).numpy()
    labels_by_id = labels[np.argsort(ids)]  # ids are dense 0..N-1
    held = np.isin(ids, seen_holdout_ids(labels_by_id, 0.25, config.train.seed))
    assert held.sum() == 12 * 3  # 3 of each training class's 12 images
    expected = knn_accuracy(embedded[held], labels[held], embedded[~held], labels[~held], k=1)
    assert seen[-1].value == pytest.approx(expected, abs=1e-6)
    assert summary.metrics["seen/knn_accuracy"] == pytest.approx(expected, abs=1e-6)
    # K centers per training class (12 classes), trained: no longer the initial ones.
    learner = load_training_state(summary.checkpoint_path)["learner"]
    centers = [v for k, v in learner.items() if k.startswith("loss.") and v.ndim == 2]
    assert [tuple(c.shape) for c in centers] == [(12 * 3, config.model.embedding_dim)]
    from pipeline.losses import build_loss
    from pipeline.models import build_model

    torch.manual_seed(config.train.seed)  # the initial centers, drawn as the workers drew them
    build_model(config.model)
    initial = [p for p in build_loss(config.loss, 12, config.model.embedding_dim).parameters() if p.ndim == 2]
    assert not torch.allclose(centers[0], initial[0].detach())


SIGTERM_DRIVER = """
import os, signal, sys, threading, time
import ray
from pipeline import tracking
from pipeline.config import load_config
from pipeline.training import driver
from pipeline.training.driver import RunInterrupted, _fit, resume_hint, run_training

def sigterm_soon():  # what `ray job stop` sends
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()

@ray.remote(num_cpus=0)
def training():
    time.sleep(60)

class StoppedTrainer:  # TorchTrainer.fit() waits in ray.get for its controller's run
    def fit(self):
        sigterm_soon()
        ray.get(training.remote())

def stopped_while_starting(*args):
    sigterm_soon()
    time.sleep(60)

def failed_training(*args):
    raise RuntimeError("training failed")

def stopped_while_closing(*args, finish_run=tracking.finish_run, **kwargs):
    sigterm_soon()
    time.sleep(3)  # the signal comes meanwhile: it waits until the run is closed
    return finish_run(*args, **kwargs)

when, address, settings = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config("local", settings)
ray.init(address=address)  # installs Ray's SIGTERM handler in this driver
# Python's handler in place of the C++ one Ray's core set, which aborts 3 s after a SIGTERM
# (as _fit's watch does once fit() starts; this driver must live to print).
signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
try:
    if when == "in fit":
        _fit(StoppedTrainer(), None, print)
    elif when == "starting":  # once the MLflow run exists, before fit()
        driver._record_conversion_summary = stopped_while_starting
        run_training(config, printer=lambda *a, **k: None)
    else:  # a failed run, closing
        driver._fit = failed_training
        tracking.finish_run = stopped_while_closing
        run_training(config, printer=lambda *a, **k: None)
except RunInterrupted as err:
    print(f"{when}: settled={err.settled} exit code={getattr(err.__cause__, 'code', None)}", flush=True)
    print(resume_hint(config, err.settled), flush=True)
except RuntimeError as err:
    print(f"{when}: {err}", flush=True)
"""


def test_a_sigterm_stop_says_ray_train_may_still_register_a_later_checkpoint(ray_local, tmp_path):
    """`ray job stop`'s default SIGTERM reaches the driver through Ray's own handler, which
    leaves Ray Train's controller running (benchmarks/job_stop.py: the driver named step 8
    while the record went on to step 12): during fit() the hint must not name a step as final.
    Ray's handler raises SystemExit(1) there, in a ray.get, not 15. Before fit() no controller
    runs: the hint is final, and the run is left KILLED, not FAILED. While a run closes, the
    stop waits until it is closed."""
    import ray
    from mlflow import MlflowClient

    from pipeline import tracking

    later = " (or from a later one, if Ray Train registers one while the job stops)"
    expected = {
        "in fit": f"in fit: settled=False exit code=1\nrun in-fit has no checkpoint yet: the same command "
                  f"starts it again{later}\n",
        "starting": "starting: settled=True exit code=15\nrun starting has no checkpoint yet: the same "
                    "command starts it again\n",
        "closing": "closing: training failed\n",
    }
    statuses = {}
    for when, output in expected.items():  # a process each: Ray stops the driver's work with it
        name = when.replace(" ", "-")
        settings = TINY + [f"data.cache_dir={tmp_path / 'data'}", f"train.storage_path={tmp_path / name}",
                           f"train.run_name={name}"]
        done = subprocess.run(
            [sys.executable, "-c", SIGTERM_DRIVER, when, ray.get_runtime_context().gcs_address, *settings],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert output in done.stdout, done.stdout + done.stderr[-3000:]
        config = load_config("local", settings)
        client = MlflowClient(tracking.tracking_uri(config))
        experiment = client.get_experiment_by_name(config.tracking.experiment)  # (none: no run_training)
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        statuses[when] = [run.info.status for run in runs]
    assert statuses == {"in fit": [], "starting": ["KILLED"], "closing": ["FAILED"]}


def test_ctrl_c_stops_the_job_records_it_killed_and_says_where_a_rerun_resumes(ray_local, tmp_path):
    import ray
    from mlflow import MlflowClient

    from pipeline import tracking

    settings = TINY + [f"data.cache_dir={tmp_path / 'data'}", f"train.storage_path={tmp_path / 'runs'}",
                       "train.epochs=100", "train.run_name=stopped"]
    log_path = tmp_path / "job.log"
    with log_path.open("w") as log:
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", *(a for item in settings for a in ("--set", item))],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        )
        deadline = time.monotonic() + 300
        while (found := registered_checkpoint(str(tmp_path / "runs"), "stopped")) is None:
            assert job.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        job.send_signal(signal.SIGINT)  # Ctrl+C, while it trains
        rc = job.wait(timeout=180)
    text = log_path.read_text()
    assert rc == 130, text[-3000:]
    resumed = re.search(r"interrupted: the same command resumes run stopped from its checkpoint at step (\d+)\n", text)
    assert resumed and int(resumed[1]) >= found[2], text[-3000:]  # Ray Train aborted first: no "later one"
    assert "Traceback" not in text
    config = load_config("local", settings)
    client = MlflowClient(tracking.tracking_uri(config))
    [run] = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id])
    assert run.info.status == "KILLED"
