"""Convert a dataset in its released layout into the project's format, encoding on Ray.

Order of work: refuse an occupied destination, parse the layout's metadata (every error in
it stops here, before Ray starts), then encode chunks of images in Ray tasks with fractional
CPUs while the driver streams their records, in order, into `write_dataset`, and finally
write `conversion_summary.json` beside metadata.json: what was converted, what was skipped
and why.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.data.convert.cars196 import read_cars196
from pipeline.data.convert.cub import read_cub
from pipeline.data.convert.encoding import EncodeOptions, encode_chunk
from pipeline.data.convert.folders import read_folders
from pipeline.data.convert.inshop import read_inshop
from pipeline.data.convert.sop import read_sop
from pipeline.data.convert.source import ConversionPlan, SkippedImage, SourceImage, SourceTree
from pipeline.data.format import DEFAULT_SHARD_SIZE, METADATA_FILE, root_filesystem, write_dataset
from pipeline.storage import store_errors_named, worker_env_vars

SUMMARY_FILE = "conversion_summary.json"
"""Written at the dataset root after metadata.json: counts, skipped images, options."""

LAYOUTS: dict[str, Callable[..., ConversionPlan]] = {
    "cub": read_cub,
    "cars196": read_cars196,
    "sop": read_sop,
    "inshop": read_inshop,
    "folders": read_folders,
}
"""Layout name -> the reader of that release's metadata."""


@dataclass(frozen=True)
class ConversionOptions:
    """Everything about a conversion that is not the layout, source or destination."""

    encode: EncodeOptions = field(default_factory=EncodeOptions)
    shard_size: int = DEFAULT_SHARD_SIZE
    """Rows per Parquet shard."""
    overwrite: bool = False
    """Replace a dataset already at the destination (otherwise refuse)."""
    test_fraction: float = 0.5
    """`folders` only: fraction of the class folders that goes to the test split."""
    seed: int = 0
    """`folders` only: seed of the shuffle that picks the test classes."""
    chunk_size: int = 64
    """Images per Ray task."""
    cpus_per_task: float = 0.5
    """CPUs each Ray task reserves (fractional: decoding also waits on IO)."""

    def __post_init__(self) -> None:
        for name in ("shard_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")


def read_plan(layout: str, source: str, options: ConversionOptions) -> ConversionPlan:
    """Parse a source's metadata with its layout's reader (no image is read, no Ray)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    tree = SourceTree(source)
    if layout == "folders":
        return read_folders(tree, test_fraction=options.test_fraction, seed=options.seed)
    return LAYOUTS[layout](tree)


def check_destination(destination: str, overwrite: bool) -> None:
    """Refuse a destination that already holds anything unless `overwrite` (nothing written)."""
    fs, path = root_filesystem(destination)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"{destination}: is a file; the destination must be a directory")
    if info.type == pafs.FileType.NotFound or overwrite:
        return
    held = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if held:
        names = sorted(posixpath.basename(entry.path) for entry in held)
        if METADATA_FILE not in names and any(entry.type == pafs.FileType.Directory for entry in held):
            # Shards but no metadata.json (written last): a conversion stopped part-way.
            raise FileExistsError(
                f"{destination}: holds an unfinished conversion ({', '.join(names[:5])}, no "
                f"{METADATA_FILE}); pass --overwrite to convert into it again"
            )
        raise FileExistsError(
            f"{destination}: already holds {', '.join(names[:5])}; pass --overwrite to replace "
            "the dataset there"
        )


class _Progress:
    """Prints a split's progress at most every `every_seconds`, and when it is done."""

    def __init__(self, split: str, total: int, printer, every_seconds: float = 5.0):
        self.split, self.total, self.printer = split, total, printer
        self.every_seconds = every_seconds
        self.done = self.skipped = 0
        self.start = self.last = time.perf_counter()

    def update(self, done: int, skipped: int) -> None:
        self.done += done
        self.skipped += skipped
        now = time.perf_counter()
        if now - self.last >= self.every_seconds or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            self.printer(
                f"  {self.split}: {self.done}/{self.total} images ({100 * self.done // self.total}%)"
                f", {self.skipped} skipped, {rate:.0f} images/s",
                flush=True,
            )


def _encoded_records(
    remote, source: str, split: str, images: list[SourceImage], options: ConversionOptions,
    in_flight: int, skipped: list[SkippedImage], printer,
) -> Iterator[dict]:  # fmt: skip
    """A split's records in source order, encoded by Ray tasks, at most `in_flight` at once
    (so the driver holds a bounded number of encoded chunks)."""
    import ray

    chunks = [images[i : i + options.chunk_size] for i in range(0, len(images), options.chunk_size)]
    progress = _Progress(split, len(images), printer)
    pending: collections.deque = collections.deque()
    submitted = 0
    while pending or submitted < len(chunks):
        while submitted < len(chunks) and len(pending) < in_flight:
            pending.append(remote.remote(source, split, chunks[submitted], options.encode))
            submitted += 1
        records, bad = ray.get(pending.popleft())
        skipped.extend(bad)
        progress.update(len(records) + len(bad), len(bad))
        yield from records


def _init_ray() -> bool:
    """Start a local Ray (or join RAY_ADDRESS's cluster) unless one is running; True if started."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    return True


def check_cpus_per_task(cpus_per_task: float) -> None:
    """Raise ValueError when a Ray this process would start here cannot hold one encoding task:
    Ray never schedules it, and the conversion would wait for ever with nothing said. Not
    checked against a cluster (RAY_ADDRESS; an autoscaler may add nodes) or a Ray already up."""
    import os

    import ray

    from pipeline.training.resources import uses_local_ray

    have = os.cpu_count() or 1  # what `_init_ray` gives a local Ray
    if not uses_local_ray() or cpus_per_task <= have or ray.is_initialized():
        return
    raise ValueError(f"--cpus-per-task: each encoding task would need {cpus_per_task:g} CPUs but a "
                     f"local Ray has {have}; lower it, or set RAY_ADDRESS to run on a cluster")


def _check_nodes_read_the_source(source: str, plan, printer) -> None:
    """On a cluster the encoding tasks read the source on every node: a local source must be
    there too (a node without it would skip every image it was given as unreadable). ValueError
    naming the nodes that lack it (`cluster_reach`), before anything is written."""
    from pipeline.cluster_reach import Need, check_cluster_reach, local_path

    root = local_path(source)
    first = next((images[0].path for images in plan.splits.values() if images), None)
    if root is None or first is None:
        return
    check_cluster_reach([Need("source", source, "file", os.path.join(root, first))], printer,
                        whose="the conversion's encoding tasks")


def convert_dataset(
    layout: str, source: str, destination: str, options: ConversionOptions | None = None,
    printer=print,
) -> dict[str, Any]:  # fmt: skip
    """Convert `source` (in `layout`'s released layout) into the project's format at
    `destination`; returns the conversion summary (also written to SUMMARY_FILE there)."""
    import ray

    options = options or ConversionOptions()
    start = time.perf_counter()
    with store_errors_named("destination"):
        check_destination(destination, options.overwrite)
    check_cpus_per_task(options.cpus_per_task)
    with store_errors_named("source"):
        plan = read_plan(layout, source, options)
    sizes = ", ".join(f"{split} {len(images)}" for split, images in sorted(plan.splits.items()))
    printer(
        f"{layout}: {len(plan.class_names)} classes, {plan.num_images} images ({sizes}) from "
        f"{source}",
        flush=True,
    )
    started = _init_ray()
    try:
        _check_nodes_read_the_source(source, plan, printer)
        slots = ray.cluster_resources().get("CPU", 1.0) / options.cpus_per_task
        in_flight = max(2, 2 * int(slots))
        # Tasks read the source themselves: on a cluster they need this process's S3 endpoint.
        remote = ray.remote(encode_chunk).options(
            num_cpus=options.cpus_per_task, runtime_env={"env_vars": worker_env_vars()}
        )
        skipped: list[SkippedImage] = list(plan.skipped)
        metadata = write_dataset(
            destination,
            name=plan.name,
            source=plan.source,
            class_names=plan.class_names,
            splits={
                split: _encoded_records(
                    remote, source, split, images, options, in_flight, skipped, printer
                )
                for split, images in plan.splits.items()
            },
            image_format="jpeg",
            shard_size=options.shard_size,
            extra=plan.extra,
            overwrite=options.overwrite,
            evaluation=plan.evaluation,
        )
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    summary = {
        "layout": layout,
        "source": source,
        "destination": destination,
        "dataset": {"name": metadata.name, "fingerprint": metadata.fingerprint},
        "options": {
            **asdict(options.encode),
            "shard_size": options.shard_size,
            **({"test_fraction": options.test_fraction, "seed": options.seed}
               if layout == "folders" else {}),
        },  # fmt: skip
        "splits": {
            split: {
                "images": info.num_images,
                "classes": len(info.classes),
                "skipped": sum(1 for s in skipped if s.split == split),
            }
            for split, info in sorted(metadata.splits.items())
        },
        "evaluation": metadata.evaluation.to_dict() if metadata.evaluation else None,
        "skipped": {
            "count": len(skipped),
            "by_reason": dict(sorted(collections.Counter(s.reason for s in skipped).items())),
            "images": [s.to_dict() for s in skipped],
        },
        "seconds": round(seconds, 2),
    }
    fs, path = root_filesystem(destination)
    with fs.open_output_stream(posixpath.join(path, SUMMARY_FILE)) as stream:
        stream.write((json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary


def read_summary(root: str) -> dict[str, Any] | None:
    """The conversion summary written beside a converted dataset, or None (a dataset written
    another way, such as the built-in one, has none)."""
    fs, path = root_filesystem(root)
    summary_path = posixpath.join(path, SUMMARY_FILE)
    if fs.get_file_info(summary_path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(summary_path) as stream:
        return json.loads(stream.read().decode("utf-8"))


def describe_summary(summary: dict[str, Any], max_listed: int = 20) -> list[str]:
    """Printable lines of a conversion summary: splits, skipped images (the first few)."""
    lines = [f"wrote {summary['dataset']['name']} to {summary['destination']} "
             f"in {summary['seconds']:.1f} s"]  # fmt: skip
    for split, counts in summary["splits"].items():
        lines.append(
            f"  {split:<8} {counts['images']:>7} images {counts['classes']:>6} classes "
            f"{counts['skipped']:>5} skipped"
        )
    skipped = summary["skipped"]
    if skipped["count"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped["by_reason"].items())
        lines.append(f"skipped {skipped['count']} images ({reasons}):")
        for item in skipped["images"][:max_listed]:
            lines.append(f"  [{item['split'] or '-'}] id {item['id']} {item['path']}: "
                         f"{item['reason']} ({item['detail']})")  # fmt: skip
        if skipped["count"] > max_listed:
            lines.append(f"  ... and {skipped['count'] - max_listed} more (see {SUMMARY_FILE})")
    else:
        lines.append("skipped no image")
    lines.append(f"summary: {posixpath.join(summary['destination'], SUMMARY_FILE)}")
    return lines
