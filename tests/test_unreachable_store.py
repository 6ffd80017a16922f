"""An S3 store that does not answer (nothing listens at the endpoint): every job names the
argument or setting that points there, in one line before Ray starts, never a traceback."""

from __future__ import annotations

import pytest
from server_process import free_port

from pipeline.data.synthetic import SyntheticSpec, generate_synthetic


@pytest.fixture
def dead_store(restored_environ, monkeypatch):
    """AWS_ENDPOINT_URL_S3 of a port nothing listens on, with one attempt per call."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _refused(capsys, code: int, prefix: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(prefix) and "Could not connect" in err and err.count("\n") == 1, err


def test_every_job_names_the_location_of_a_store_that_does_not_answer(
    tmp_path, capsys, dead_store, ray_must_not_start
):
    from jobs.evaluate import main as evaluate_main
    from jobs.export_embeddings import main as export_main
    from jobs.prepare_data import main as prepare_main
    from jobs.sweep import main as sweep_main

    local = str(tmp_path / "data")
    generate_synthetic(local, SyntheticSpec(num_classes=4, images_per_class=3, image_size=16))
    (tmp_path / "src" / "a").mkdir(parents=True)

    once = ["--set", "storage.s3_max_attempts=1"]  # the jobs that read settings set AWS_MAX_ATTEMPTS from them
    _refused(capsys, evaluate_main(["s3://bucket/run/checkpoint_1", *once]), "error: checkpoint s3://bucket/run/checkpoint_1: ")
    _refused(capsys, export_main(["unused", "s3://bucket/data", str(tmp_path / "out")]), "error: dataset_root: ")
    _refused(capsys, export_main(["s3://bucket/ckpt", local, str(tmp_path / "out")]), "error: checkpoint s3://bucket/ckpt: ")
    _refused(capsys, export_main(["unused", local, "s3://bucket/out"]), "error: out_dir: ")
    _refused(capsys, prepare_main(["folders", "s3://bucket/src", str(tmp_path / "o")]), "prepare_data: source: ")
    _refused(capsys, prepare_main(["folders", str(tmp_path / "src"), "s3://bucket/dst"]), "prepare_data: destination: ")
    space = tmp_path / "space.yaml"
    space.write_text("name: dead\nfixed: {train.epochs: 1}\nsearch: grid\nasha: false\n"
                     "space: {train.seed: {grid: [1, 2]}}\nlosses: {triplet: {}}\n")
    _refused(capsys, sweep_main([str(space), *once, "--set", "train.storage_path=s3://bucket/runs"]),
             "sweep error: train.storage_path: ")
    _refused(capsys, sweep_main([str(space), *once, "--set", "data.root=s3://bucket/data",
                                 "--set", f"train.storage_path={tmp_path / 'runs'}"]),
             f"sweep error: {space}: losses.triplet: data.root: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "space.yaml", "src"]
