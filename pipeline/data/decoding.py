"""Fetch encoded images by id, decode them and augment them, inside Ray Data operators.

The training split's encoded bytes are read once by Ray Data and stay in the object store as
Arrow blocks (`EncodedImageStore`); a decode actor maps each plan index to ids through the
planner, slices those rows out of the blocks (zero-copy) and decodes them. Decoding uses
torchvision's native PNG/JPEG decoders on uint8 tensors; augmentation follows the field's
recipe (random resized crop + horizontal flip for training, resize + center crop for eval).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2

# torch and torchvision are imported where images are decoded, not here: Ray Data's split
# coordinator and executor unpickle this module's classes and functions without running them,
# and importing torchvision (models included) took them 2.4 s of a run's start on a 2-core VM.


@dataclass
class EncodedImageStore:
    """A split's encoded images in the object store, addressable by example id."""

    block_refs: list
    block_of: np.ndarray
    row_of: np.ndarray
    labels: np.ndarray
    """Label of each id, remapped to 0..C-1 over the split's classes (what losses see)."""
    classes: np.ndarray
    """The original class index of each remapped label."""

    @classmethod
    def from_dataset(cls, dataset) -> EncodedImageStore:
        """Materialise a Ray Dataset of (id, label, image) rows and index it by id.

        Only each block's ids and labels come to the caller (the driver), read by a task
        beside the block: the encoded images stay in the object store, so the driver's memory
        and the head node's network do not grow with the training split's bytes.
        """
        import ray

        refs = dataset.to_arrow_refs()
        # Zero CPUs: a few column reads, which must not wait behind a run's reserved CPUs. Ray
        # resolves each block where its task runs, and prefers the node that holds it.
        read_columns = ray.remote(num_cpus=0)(_ids_and_labels)
        columns = ray.get([read_columns.remote(ref) for ref in refs])
        num = sum(len(ids) for ids, _ in columns)
        block_of = np.full(num, -1, dtype=np.int32)
        row_of = np.zeros(num, dtype=np.int64)
        raw_labels = np.zeros(num, dtype=np.int64)
        for b, (ids, block_labels) in enumerate(columns):
            outside = ids[(ids < 0) | (ids >= num)]
            if outside.size:
                raise ValueError(f"example ids must be dense 0..{num - 1}; found id {outside[0]}")
            block_of[ids] = b
            row_of[ids] = np.arange(len(ids))
            raw_labels[ids] = block_labels
        if (block_of < 0).any():
            missing = np.flatnonzero(block_of < 0)[:5].tolist()
            raise ValueError(f"example ids are not dense: ids such as {missing} are missing")
        classes, labels = np.unique(raw_labels, return_inverse=True)
        return cls(refs, block_of, row_of, labels.astype(np.int64), classes)

    def __len__(self) -> int:
        return len(self.labels)

    def encoded_images(self) -> Callable[[int], bytes]:
        """Fetch the image columns from the object store once; return `id -> encoded bytes`."""
        import ray

        columns = [table.column("image") for table in ray.get(self.block_refs)]
        block_of, row_of = self.block_of, self.row_of

        def encoded(i: int) -> bytes:
            return columns[block_of[i]][int(row_of[i])].as_py()

        return encoded


def _ids_and_labels(table) -> tuple[np.ndarray, np.ndarray]:
    """A block's id and label columns, as int64 arrays."""
    return (table.column("id").to_numpy().astype(np.int64, copy=False),
            table.column("label").to_numpy().astype(np.int64, copy=False))


def decode_rgb(data: bytes) -> torch.Tensor:
    """PNG or JPEG bytes -> uint8 tensor [3, H, W]."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def train_transform(image_size: int, crop_scale_min: float) -> v2.Transform:
    """Random resized crop and horizontal flip, on uint8 tensors."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def eval_transform(image_size: int, resize: int) -> v2.Transform:
    """Resize the short side, then center crop."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])


class TrainBatchDecoder:
    """Ray Data callable: plan indices in, decoded and augmented sub-batches out.

    One output row per plan index, holding the whole sub-batch, so a rank always receives
    exactly one planned sub-batch per step.
    """

    def __init__(self, planner, store: EncodedImageStore, image_size: int, crop_scale_min: float, seed: int,
                 index_offset: int = 0, index_stride: int = 1):
        """Input row `id` is plan index `index_offset + index_stride * id` (one rank's stream
        when the ranks have a stream each)."""
        import torch

        torch.set_num_threads(1)
        self.planner = planner
        self.store = store
        self.encoded = store.encoded_images()
        self.transform = train_transform(image_size, crop_scale_min)
        self.seed = seed
        self.index_offset = index_offset
        self.index_stride = index_stride

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipeline.data.planning import as_planned

        images, labels, ids = None, [], []
        extras: dict[str, list] = {}
        plan_indices = self.index_offset + self.index_stride * np.asarray(batch["id"], dtype=np.int64)
        for k, index in enumerate(plan_indices):
            planned = as_planned(self.planner.plan(int(index)))
            plan_ids = planned.ids
            # Extras (per example, e.g. Magnet's clusters) and info (scalars, e.g. the index
            # version) travel as extra columns of the row.
            for name, value in planned.extras.items():
                extras.setdefault(f"extra_{name}", []).append(np.asarray(value))
            for name, value in planned.info.items():
                extras.setdefault(f"info_{name}", []).append(np.int64(value))
            # Augmentation is seeded by the plan index: the same sub-batch whichever actor makes it.
            torch.manual_seed(self.seed * 1_000_003 + int(index))
            decoded = [self.transform(decode_rgb(self.encoded(i))) for i in plan_ids]
            if images is None:
                # Each sub-batch is stacked straight into the block's array: stacking them
                # afterwards held the block twice (a block of the gpu preset's sub-batches
                # peaked at 285 MB against 156 MB; benchmarks/decode_memory.py).
                first = decoded[0].numpy()
                images = np.empty((len(plan_indices), len(decoded), *first.shape), dtype=first.dtype)
            torch.stack(decoded, out=torch.from_numpy(images[k]))
            labels.append(self.store.labels[plan_ids])
            ids.append(plan_ids)
        return {
            "index": plan_indices,
            "images": images,
            "labels": np.stack(labels),
            "ids": np.stack(ids),
            **{name: np.stack(values) for name, values in extras.items()},
        }


def sub_batch_columns(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a `TrainBatchDecoder` row (one whole sub-batch, leading dim 1) that go to
    the device: `images`, `labels`, and the planner's `extra_<name>` columns as `<name>`. The
    `ids` and `info_` columns stay on the host (the refresh reads them)."""
    columns = {"images": row["images"][0], "labels": row["labels"][0]}
    columns.update({key[len("extra_"):]: value[0] for key, value in row.items() if key.startswith("extra_")})
    return columns


class ReplayCache:
    """Batches streamed once, then replayed from memory if they all fit in `limit_bytes`.

    For decodes that are deterministic (the eval transform): the first pass streams and keeps
    the batches, later passes are free. Past the limit nothing is kept and every pass streams.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.kept: list | None = None

    def batches(self, stream):
        """The kept batches, or those of `stream()` (a callable), kept when they fit."""
        if self.kept is not None:
            yield from self.kept
            return
        kept: list | None = []
        size = 0
        for batch in stream():
            size += _nbytes(batch)
            if kept is not None and size <= self.limit_bytes:
                kept.append(batch)
            else:
                kept = None
            yield batch
        self.kept = kept


class PrefixCache:
    """Batches streamed once, then replayed from memory as far as they fit in `limit_bytes`:
    the first ones that fit are kept, and each later pass replays them and streams the rest
    from where they end.

    For a deterministic decode whose stream can start at any batch (`stream(start)` yields the
    batches from number `start` on): the refresh actor's passes over the training split. A
    split decoded to twice the limit is then half replayed, where `ReplayCache` (all or
    nothing, for Ray Data streams, which cannot start part-way) would decode all of it again.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.kept: list = []
        """The first batches of the stream, in order (a prefix: nothing after a batch that did
        not fit is kept)."""
        self.kept_bytes = 0
        self.whole = False
        """Whether `kept` is the whole stream: a pass then streams nothing."""
        self._closed = False  # a batch did not fit: the prefix ends there

    def batches(self, stream):
        """Every batch in order: the kept ones, then those of `stream(len(kept))`, kept while
        they fit (a pass cut short keeps what it had kept, still a prefix)."""
        kept = list(self.kept)  # this pass appends to self.kept
        yield from kept
        if self.whole:
            return
        for batch in stream(len(kept)):
            size = _nbytes(batch)
            if not self._closed and self.kept_bytes + size <= self.limit_bytes:
                self.kept.append(batch)
                self.kept_bytes += size
            else:
                self._closed = True
            yield batch
        self.whole = not self._closed


def _nbytes(batch) -> int:
    return sum(v.nbytes for v in batch.values()) if isinstance(batch, dict) else batch.nbytes


def decoded_batches(decode_one, count: int, batch_size: int, threads: int, start: int = 0):
    """`np.stack([decode_one(i) for i in batch])` for the ids `start` .. count - 1 in batches
    of `batch_size`, in id order, decoded by `threads` threads.

    torchvision's decoders and resizes release the GIL, so threads decode in parallel (the
    refresh actor's first pass over the training split, which on a large split is what a
    Magnet run's first step waits for). The next batch is decoded while the caller works on
    this one, and no further: at most two batches are held, whatever the split's size."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:

        def submit(first: int) -> list:
            return [pool.submit(decode_one, i) for i in range(first, min(first + batch_size, count))]

        ahead = submit(start)
        for first in range(start, count, batch_size):
            current, ahead = ahead, submit(first + batch_size)
            yield np.stack([future.result() for future in current])


def decode_eval_batch(batch: dict[str, np.ndarray], image_size: int, resize: int) -> dict[str, np.ndarray]:
    """Ray Data function: encoded rows in, resized and center-cropped uint8 images out."""
    transform = eval_transform(image_size, resize)
    images = np.stack([transform(decode_rgb(data)).numpy() for data in batch["image"]])
    return {"image": images, "label": batch["label"], "id": batch["id"]}
