"""Finding the checkpoint a rerun resumes from, without Ray (the driver hands it to the refresh actor)."""

from __future__ import annotations

import json

from pipeline.training.checkpoint import METRICS_FILE, latest_checkpoint


def _checkpoint(root, name, step=None):
    directory = root / "run" / name
    directory.mkdir(parents=True)
    if step is not None:
        (directory / METRICS_FILE).write_text(json.dumps({"step": step}))


def test_the_highest_step_wins_and_incomplete_checkpoints_are_skipped(tmp_path):
    # Names sort the other way round from steps, and the newest directory has no metrics yet.
    _checkpoint(tmp_path, "checkpoint_2026-01-02", step=4)
    _checkpoint(tmp_path, "checkpoint_2026-01-01", step=8)
    _checkpoint(tmp_path, "checkpoint_2026-01-03")
    _checkpoint(tmp_path, "not_a_checkpoint", step=99)
    filesystem, directory, step = latest_checkpoint(str(tmp_path), "run")
    assert directory.endswith("checkpoint_2026-01-01") and step == 8
    assert filesystem.get_file_info(f"{directory}/{METRICS_FILE}").size > 0


def test_a_run_never_started_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path), "run") is None


def test_a_reported_checkpoint_is_named_with_its_storages_scheme():
    from pipeline.training.driver import checkpoint_uri

    # Ray Train reports a path inside the storage's filesystem; alone it reads as a local path.
    assert checkpoint_uri("s3://b/runs", "b/runs/r/checkpoint_1") == "s3://b/runs/r/checkpoint_1"
    assert checkpoint_uri("gs://b/runs", "b/runs/r/checkpoint_1") == "gs://b/runs/r/checkpoint_1"
    assert checkpoint_uri("file:///data/runs", "/data/runs/r/checkpoint_1") == "file:///data/runs/r/checkpoint_1"
    assert checkpoint_uri("/data/runs", "/data/runs/r/checkpoint_1") == "/data/runs/r/checkpoint_1"
