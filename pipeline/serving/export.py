"""Export a checkpoint's embeddings of a dataset split (Parquet) and a faiss index over them,
so that a trained model serves retrieval.

Layout of an export directory (local or `s3://`):

    embeddings/part-00000.parquet   id, label, embedding (fixed-size list of float32), id order
    index.faiss                     faiss IDMap2 index (searches return dataset ids)
    export.json                     what was exported from what; written last
    .export.lock                    the lock of the export writing it (`pipeline.locks`): a
                                    file that stays in a local directory; in S3 an object
                                    deleted when the export ends

Everything that can be wrong (the output directory, the dataset, the split, the checkpoint,
the index description) is found before Ray starts, and an existing export is never overwritten.
Two exports into one new directory at once: the second is refused (`pipeline.locks`).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import tempfile
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from pipeline import locks
from pipeline.config.settings import Config
from pipeline.data.format import DatasetMetadata, read_metadata, shard_uris, validate_dataset
from pipeline.refresh.hard_pools import check_index_trains
from pipeline.serving.checkpoints import fetch_checkpoint, load_served_checkpoint
from pipeline.serving.driver_tasks import cluster_task_cpus, task_result, use_reserved_cpus
from pipeline.serving.embedding import (
    check_actors_fit_locally,
    collect_embeddings,
    embed_split,
    start_ray,
)
from pipeline.serving.index import (
    INDEX_FILE,
    MANIFEST_FILE,
    build_index,
    check_index_description,
    save_index,
    write_embeddings,
)
from pipeline.storage import filesystem_for, store_errors_named, worker_env_vars


@dataclass
class ExportSummary:
    """Where an export is and what it holds."""

    export_dir: str
    num_embeddings: int
    embedding_dim: int
    index_path: str


LOCK_NAME = ".export"
"""The export lock's name (`pipeline.locks`): `<export dir>/.export.lock`."""


def check_export_dir(export_dir: str) -> None:
    """Refuse an output directory that already holds anything but an export lock (an export is
    never overwritten)."""
    filesystem, path = filesystem_for(export_dir)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"output directory {export_dir}: is a file")
    if info.type == pafs.FileType.Directory and any(
        posixpath.basename(entry.path) != f"{LOCK_NAME}.lock"
        for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    ):
        raise FileExistsError(
            f"output directory {export_dir}: not empty; choose a new directory (nothing there "
            "is overwritten)"
        )


def export_embeddings(
    checkpoint: str,
    dataset_root: str,
    export_dir: str,
    *,
    split: str = "test",
    storage_path: str = "runs",
    index_description: str = "Flat",
    batch_size: int = 0,
    actors: int = 0,
    device: str = "auto",
    cpus: int = 0,
    verbose: bool = False,
    printer=print,
) -> ExportSummary:
    """Embed `split` of the dataset at `dataset_root` with the checkpoint (a directory or a run
    name under `storage_path`), on `device`'s actors (`embedding.DEVICES`), write the
    embeddings and a faiss index to `export_dir`."""
    if batch_size < 0 or actors < 0 or cpus < 0:
        raise ValueError(f"--batch-size, --actors and --cpus: must be >= 0 (0: the default), got "
                         f"{batch_size}, {actors} and {cpus}")
    check_actors_fit_locally(actors, device)
    with store_errors_named("out_dir"):
        check_export_dir(export_dir)
    with store_errors_named("dataset_root"):
        metadata = read_metadata(dataset_root)
        if split not in metadata.splits:
            splits = ", ".join(metadata.splits)
            raise ValueError(f"split {split!r}: {dataset_root} has no such split (it has {splits})")
        validate_dataset(dataset_root)
    with tempfile.TemporaryDirectory() as scratch:
        with store_errors_named(f"checkpoint {checkpoint}"):
            directory = fetch_checkpoint(checkpoint, storage_path, scratch, "--storage-path")
        model, config, step = load_served_checkpoint(directory)
    shown = checkpoint if "://" in checkpoint else directory  # a fetched copy is gone by now
    check_index_description(config.model.embedding_dim, index_description)
    num_images = metadata.split(split).num_images
    check_index_trains(config.model.embedding_dim, index_description, num_images, "--index",
                       f"the {num_images} images of split {split!r}")
    printer(
        f"export {shown} (step {step}): {metadata.name} {split} "
        f"({num_images} images) -> {export_dir}",
        flush=True,
    )

    # Held while this export writes: another export into the same new directory is refused,
    # and one that finished meanwhile is found by checking the directory again.
    filesystem, path = filesystem_for(export_dir)
    created = filesystem.get_file_info(path).type == pafs.FileType.NotFound
    try:
        with locks.exclusive(export_dir, LOCK_NAME, lambda holder: (
            f"output directory {export_dir}: another export is writing into it ({holder}); "
            "choose a new directory"
        )):
            check_export_dir(export_dir)
            return _export(_Plan(model, config, step, shown, dataset_root, metadata, split,
                                 export_dir, index_description, batch_size, actors, device, cpus),
                           verbose, printer)
    except BaseException:
        if created:  # a failed export leaves no directory it made that holds only its lock
            _remove_if_only_lock(filesystem, path)
        raise


def _remove_if_only_lock(filesystem, path: str) -> None:
    with contextlib.suppress(OSError):
        entries = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if all(posixpath.basename(entry.path) == f"{LOCK_NAME}.lock" for entry in entries):
            filesystem.delete_dir(path)


@dataclass(frozen=True)
class _Plan:
    """What an export's checks settled: the loaded model and where it came from, what it
    embeds, and where and how the export is written."""

    model: torch.nn.Module
    config: Config
    step: int | None
    shown: str  # the checkpoint as the manifest and messages name it
    dataset_root: str
    metadata: DatasetMetadata
    split: str
    export_dir: str
    index_description: str
    batch_size: int
    actors: int
    device: str
    cpus: int  # the CPUs the writing task reserves on a cluster (`driver_tasks.task_cpus`)


def writes_on_the_driver(export_dir: str) -> bool:
    """Whether the driver itself gathers the embeddings and writes the export: with a local Ray,
    whose one machine is the driver's (a task would only add a copy of the split in the object
    store), and for a local directory on a cluster (RAY_ADDRESS set), which is the driver's own
    disk. Otherwise (`s3://` on a cluster) a Ray task does, off the head node
    (`pipeline.serving.driver_tasks`)."""
    from pipeline.cluster_reach import local_path
    from pipeline.training.resources import uses_local_ray

    return uses_local_ray() or local_path(export_dir) is not None


def _export(plan: _Plan, verbose: bool, printer) -> ExportSummary:
    """Embed, index and write the export (its checks passed and its lock held)."""
    config, metadata, split = plan.config, plan.metadata, plan.split
    start_ray(verbose)
    dataset = embed_split(
        plan.model, config, shard_uris(plan.dataset_root, split),
        plan.batch_size or config.eval.batch_size, plan.actors, plan.device, printer,
    )
    manifest = {
        "checkpoint": plan.shown,
        "checkpoint_step": plan.step,
        "dataset_root": plan.dataset_root,
        "dataset_name": metadata.name,
        "dataset_fingerprint": metadata.fingerprint,
        "split": split,
        "num_embeddings": None,  # (filled in by `write_export`)
        "embedding_dim": None,
        "metric": "squared_l2",
        "index": {"file": INDEX_FILE, "faiss_factory": f"IDMap2,{plan.index_description}"},
        "model": {
            "backbone": config.model.backbone,
            "embedding_dim": config.model.embedding_dim,
            "normalize": config.model.normalize,
        },
        "transform": {"image_size": config.data.image_size, "eval_resize": config.data.eval_resize},
    }
    task_args = (plan.export_dir, plan.index_description, metadata.split(split).num_images, manifest)
    if writes_on_the_driver(plan.export_dir):
        count, dim, index_path = write_export(dataset, *task_args)
    else:
        import ray

        # Embedded first, its actors let go: the task's CPUs might be those they need.
        dataset = dataset.materialize()
        # No retries: a worker killed for memory would be killed again, after as long.
        task = ray.remote(_write_export_in_task).options(
            num_cpus=cluster_task_cpus(plan.cpus), max_retries=0,
            runtime_env={"env_vars": worker_env_vars()},
        )
        ref = task.remote(dataset, *task_args)
        try:
            count, dim, index_path = task_result(ref)
        except BaseException:
            # Stopped before it was done: the task must not go on writing once the lock is let go.
            ray.cancel(ref, force=True)
            raise
    printer(f"wrote {count} embeddings of dimension {dim} and {index_path}", flush=True)
    return ExportSummary(plan.export_dir, count, dim, index_path)


def write_export(dataset, export_dir: str, index_description: str, expected: int,
                 manifest: dict) -> tuple[int, int, str]:
    """Gather the embedded split `dataset` in id order, build its index and write the export
    to `export_dir` with `manifest` (what was exported from what) completed, last; return the
    number of embeddings, their dimension and the index's path."""
    ids, labels, embeddings = collect_embeddings(dataset)
    if len(ids) != expected:
        raise RuntimeError(f"embedded {len(ids)} images of split {manifest['split']!r}, expected {expected}")
    # Built before anything is written, should faiss still refuse to train it.
    index = build_index(embeddings, ids, index_description)
    filesystem, path = filesystem_for(export_dir)
    filesystem.create_dir(path)
    write_embeddings(export_dir, ids, labels, embeddings)
    index_path = save_index(index, export_dir)
    manifest = {**manifest, "num_embeddings": int(len(ids)), "embedding_dim": int(embeddings.shape[1])}
    with filesystem.open_output_stream(f"{path}/{MANIFEST_FILE}") as stream:
        stream.write(json.dumps(manifest, indent=2).encode())
    return int(len(ids)), int(embeddings.shape[1]), index_path


def _write_export_in_task(dataset, export_dir: str, index_description: str, expected: int,
                          manifest: dict) -> tuple[int, int, str]:
    """Ray task: `write_export` on the CPUs the task reserved."""
    use_reserved_cpus()
    return write_export(dataset, export_dir, index_description, expected, manifest)
