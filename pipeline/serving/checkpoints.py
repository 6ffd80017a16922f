"""Find the checkpoint a user names (a directory, local or URI, or a run name) and fetch it."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.storage import absolute_location, filesystem_for
from pipeline.training.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    CheckpointRecordUnreadable,
    latest_checkpoint,
    load_checkpoint_config,
    load_metrics,
    registered_checkpoint,
)


class CheckpointNotFound(ValueError):
    """The checkpoint reference names nothing this pipeline wrote."""


_SERVED_FILES = (MODEL_FILE, CONFIG_FILE)
"""What evaluate and export read from a checkpoint: a directory holding both is one."""


def _is_checkpoint(filesystem: pafs.FileSystem, directory: str) -> bool:
    infos = filesystem.get_file_info([f"{directory}/{name}" for name in _SERVED_FILES])
    return all(info.type == pafs.FileType.File for info in infos)


def run_checkpoint(storage_path: str, run_name: str):
    """(filesystem, directory, step) of the checkpoint to use from run `run_name`, or None.

    Ray Train's record of the run comes first: it names a checkpoint only once the checkpoint
    is fully uploaded, while a listing can find one a running (or killed) job is still writing
    - metrics.json already there, model.pt half copied. A folder Ray Train made (its storage
    marker is there) but without a record has registered nothing yet: whatever checkpoint
    directory it holds is mid-upload or was never reported. Only a folder Ray Train did not
    make (checkpoint directories copied on their own), or whose record does not read, falls
    back to the listing, of checkpoints that hold their weights and config."""
    from ray.train.v2._internal.constants import (
        CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
        VALIDATE_STORAGE_MARKER_FILENAME,
    )

    filesystem, root = filesystem_for(storage_path.rstrip("/") + "/" + run_name)
    record, marker = filesystem.get_file_info(
        [f"{root}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}", f"{root}/{VALIDATE_STORAGE_MARKER_FILENAME}"]
    )
    if record.type == pafs.FileType.File:
        try:
            return registered_checkpoint(storage_path, run_name)
        except CheckpointRecordUnreadable:  # from another Ray version, or a checkpoint deleted by hand
            pass
    elif marker.type == pafs.FileType.File:
        return None
    return latest_checkpoint(storage_path, run_name, with_files=_SERVED_FILES)


def locate_checkpoint(reference: str, storage_path: str,
                      storage_setting: str = "train.storage_path") -> tuple[pafs.FileSystem, str]:
    """(filesystem, directory) of the checkpoint `reference` names: a checkpoint directory, a
    run directory (its latest checkpoint, see `run_checkpoint`), or a run name under
    `storage_path` (likewise; `storage_setting` is what the user set it with, for messages)."""
    filesystem, path = filesystem_for(reference)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        if _is_checkpoint(filesystem, path):
            return filesystem, path
        run_dir = absolute_location(reference)
        parent, name = run_dir.rsplit("/", 1)
        found = run_checkpoint(parent or "/", name)
        if found is None:
            raise CheckpointNotFound(
                f"checkpoint {reference}: the directory holds neither {MODEL_FILE} and "
                f"{CONFIG_FILE} (a checkpoint) nor a checkpoint Ray Train registered or complete "
                f"checkpoint_* directories (a run)"
            )
        return found[0], found[1]
    if "://" in reference or "/" in reference:
        what = "a file, not a checkpoint directory" if kind == pafs.FileType.File else "no such directory"
        raise CheckpointNotFound(f"checkpoint {reference}: {what}")
    found = run_checkpoint(absolute_location(storage_path), reference)
    if found is None:
        raise CheckpointNotFound(
            f"checkpoint {reference}: not a directory, and no run of that name has a checkpoint "
            f"under {storage_setting}={storage_path} (a run that is training has none until "
            f"Ray Train registers its first; a checkpoint directory can be named itself)"
        )
    return found[0], found[1]


def fetch_checkpoint(reference: str, storage_path: str, scratch: str,
                     storage_setting: str = "train.storage_path") -> str:
    """A local directory holding the checkpoint `reference` names: the directory itself when it
    is local, else a copy under `scratch` (from s3:// or any URI pyarrow reads)."""
    filesystem, directory = locate_checkpoint(reference, storage_path, storage_setting)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return directory
    local = Path(scratch) / posixpath.basename(directory.rstrip("/"))
    # pyarrow makes the folders it finds below a prefix, not the destination itself (without
    # it, every checkpoint on S3 failed here: "Failed to open local file .../config.yaml").
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        directory,
        local,
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    return str(local)


def load_served_checkpoint(directory: str):
    """(model, config, step) of a local checkpoint directory, for evaluate and export. A file
    that is missing or does not load (damaged, cut short, from another version, weights that
    do not fit the network its config describes) raises a ValueError that names the file."""
    import torch
    import yaml

    from pipeline.models import EmbeddingNet

    def refused(name: str, what: str, err: BaseException) -> ValueError:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return ValueError(f"checkpoint {directory}/{name}: {what} ({detail})")

    try:
        config = load_checkpoint_config(directory)
    except (ValueError, OSError, yaml.YAMLError) as err:  # ConfigError is a ValueError
        raise refused(CONFIG_FILE, "does not load", err) from err
    try:
        step = load_metrics(directory).get("step")
    except (ValueError, OSError, AttributeError) as err:  # missing, not JSON, not an object
        raise refused(METRICS_FILE, "does not load", err) from err
    try:
        state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike: a damaged file
        raise refused(MODEL_FILE, "does not load", err) from err
    model = EmbeddingNet(config.model.backbone, config.model.embedding_dim, config.model.normalize)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise refused(MODEL_FILE, f"does not fit the network its {CONFIG_FILE} describes (model.backbone "
                      f"{config.model.backbone!r}, model.embedding_dim {config.model.embedding_dim})", err) from err
    return model, config, step
