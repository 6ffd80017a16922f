"""What a checkpoint holds and how it is read back (`weights_only=True`, no pickled code)."""

from __future__ import annotations

import json
import logging
import posixpath
import time
from pathlib import Path

import torch

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"


def save_checkpoint(directory: str, *, learner, optimizer, scheduler, step: int, epoch: int,
                    config_yaml: str, metrics: dict, run: dict[str, str] | None = None) -> None:
    """Write the training state, the embedding model alone, the config, the metrics and, when
    given, which run this is (`RUN_FILE`: `run_name`, MLflow `run_id`, `dataset_fingerprint`)."""
    out = Path(directory)
    torch.save(learner.embedder.state_dict(), out / MODEL_FILE)
    torch.save(
        {
            "learner": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
        },
        out / STATE_FILE,
    )
    (out / CONFIG_FILE).write_text(config_yaml)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if run:
        (out / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True))


def load_run_record(directory: str, filesystem=None) -> dict[str, str]:
    """Which run a checkpoint belongs to (what `save_checkpoint` wrote as `run`); {} for a
    checkpoint written before checkpoints kept it, or one whose file does not read. Its config
    alone cannot say: the run name hashes the config as given, the checkpoint keeps it resolved."""
    try:
        record = json.loads(_read_text(directory, RUN_FILE, filesystem))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _read_text(directory: str, name: str, filesystem=None) -> str:
    """A checkpoint file's text, from a local directory or, given a pyarrow `filesystem`, from
    one in that store."""
    if filesystem is None:
        return (Path(directory) / name).read_text()
    with filesystem.open_input_stream(f"{directory}/{name}") as stream:
        return stream.read().decode("utf-8")


def load_training_state(directory: str) -> dict:
    """The dict saved by `save_checkpoint` (tensors on CPU)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_metrics(directory: str) -> dict:
    """The metrics recorded with a checkpoint."""
    return json.loads((Path(directory) / METRICS_FILE).read_text())


def load_checkpoint_config(directory: str, filesystem=None):
    """The config a checkpoint was trained with (its `config.yaml`), read from a local
    directory or, given a pyarrow `filesystem`, from one in that store; raises ConfigError
    when it no longer loads (a setting renamed since)."""
    from pipeline.config import config_from_yaml

    return config_from_yaml(_read_text(directory, CONFIG_FILE, filesystem))


def load_embedding_model(directory: str):
    """Rebuild the embedding network of a checkpoint from its saved config and weights."""
    from pipeline.models import EmbeddingNet

    config = load_checkpoint_config(directory)
    model = EmbeddingNet(config.model.backbone, config.model.embedding_dim, config.model.normalize)
    model.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True))
    return model, config


class CheckpointRecordUnreadable(ValueError):
    """Ray Train's checkpoint record of a run stayed unreadable through every retry."""


def _train_record(storage_path: str, run_name: str, attempts: int, retry_seconds: float):
    """(filesystem, run folder, Ray Train's `Result` of the run or None when it has no record)."""
    import ray.train
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    from pipeline.storage import filesystem_for

    filesystem, root = filesystem_for(storage_path.rstrip("/") + "/" + run_name)
    # Reading the record makes Ray log a paragraph about resuming; the driver says it itself.
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for attempt in range(1, attempts + 1):
            try:
                return filesystem, root, ray.train.Result.from_path(root, storage_filesystem=filesystem)
            except CheckpointManagerInitializationError as error:
                if attempt == attempts:
                    raise CheckpointRecordUnreadable(
                        f"{root}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}: Ray Train's checkpoint record of run "
                        f"{run_name!r} could not be read in {attempts} tries ({error}); if no "
                        f"job is writing it, it is corrupt or from another Ray version: move "
                        f"the run folder away or pick another run name"
                    ) from error
                time.sleep(retry_seconds)
            except RuntimeError:  # no run folder, or nothing registered yet
                return filesystem, root, None
    finally:
        quiet.setLevel(level)
    raise AssertionError("unreachable")


def registered_checkpoint(storage_path: str, run_name: str, *, attempts: int = 5,
                          retry_seconds: float = 0.5):
    """(filesystem, directory, step) of the run's latest checkpoint in Ray Train's own record
    (its checkpoint manager's snapshot) - the one Ray Train resumes a rerun from - or None.

    A checkpoint that reached storage but was not registered when the driver died (a job
    stopped between the upload and the report) is not in that record, and Ray Train does not
    resume from it: neither may the driver, which plans the data from the resume step.

    A run that is still training rewrites the record in place after every report (not
    atomically), and deletes checkpoints past `num_to_keep` just after: a read can find the
    file empty or half written, or name a checkpoint that is gone a moment later. Such a read
    is retried up to `attempts` times, `retry_seconds` apart; a record that stays unreadable
    (corrupt, or written by another Ray version) raises `CheckpointRecordUnreadable`."""
    filesystem, _, result = _train_record(storage_path, run_name, attempts, retry_seconds)
    if result is None or result.checkpoint is None:
        return None
    return filesystem, result.checkpoint.path, int(result.metrics["step"])


def unregistered_checkpoints(storage_path: str, run_name: str) -> tuple[object, list[str]]:
    """(filesystem, directories): the run's checkpoint directories that Ray Train's record
    does not hold - uploaded by a job stopped before it registered them, never resumed from
    and never removed by `checkpoints_to_keep`. Only for a run Ray Train keeps a record of
    (a folder of checkpoints copied on their own holds none, and is left alone). Call it only
    while no job trains the run (under its lock): a running job's next checkpoint is one."""
    import pyarrow.fs as pafs

    filesystem, root, result = _train_record(storage_path, run_name, attempts=5, retry_seconds=0.5)
    if result is None or result.checkpoint is None:
        return filesystem, []
    # The latest is kept whatever the best ones are (Ray Train resumes from it).
    held = [result.checkpoint, *(checkpoint for checkpoint, _ in result.best_checkpoints)]
    kept = {posixpath.basename(checkpoint.path.rstrip("/")) for checkpoint in held}
    found = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return filesystem, sorted(
        info.path for info in found
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
        and info.base_name not in kept
    )


def latest_checkpoint(storage_path: str, run_name: str, *, with_files: tuple[str, ...] = ()):
    """(filesystem, directory, step) of the run's checkpoint directory with the highest step
    whose metrics.json reads and which holds `with_files`, found by listing storage (no Ray
    needed), or None. Works for local and `s3://` storage (pyarrow). A checkpoint being
    uploaded can already have its metrics.json and not yet all of its weights: a run Ray Train
    recorded is read with `registered_checkpoint`, and this listing serves folders without
    that record."""
    import pyarrow.fs as pafs

    from pipeline.storage import filesystem_for

    filesystem, root = filesystem_for(storage_path.rstrip("/") + "/" + run_name)
    found = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    best = None
    for info in found:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with filesystem.open_input_stream(f"{info.path}/{METRICS_FILE}") as stream:
                step = json.loads(stream.read())["step"]
        except (OSError, ValueError, KeyError):  # an incomplete checkpoint: Ray never reported it
            continue
        present = filesystem.get_file_info([f"{info.path}/{name}" for name in with_files])
        if any(file.type != pafs.FileType.File for file in present):
            continue
        if best is None or step > best[0]:
            best = (step, info.path)
    return None if best is None else (filesystem, best[1], best[0])
