"""Sub-batches from a worker's Ray Data stream, put on the training device one step ahead.

A copy from ordinary (pageable) host memory to a GPU makes the CPU wait until the GPU has
finished everything queued before it, so every step would start with the GPU idle while the
images cross the bus. Here each sub-batch is pinned and copied on a side CUDA stream while the
previous step still computes; the step's stream waits only for that copy. On a CPU there is
nothing to overlap and the batch is converted in place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DeviceBatch:
    """One sub-batch on the training device, in the form the model takes."""

    images: torch.Tensor
    """Float images in [0, 1], [B, C, H, W] (channels_last memory when asked)."""
    labels: torch.Tensor
    extras: dict[str, torch.Tensor]
    """The planner's `extra_<name>` columns under `<name>` (Magnet: `clusters`)."""


class DeviceFeed:
    """Takes rows of `batches` (each row a whole sub-batch, numpy) and yields them with their
    tensors on `device`; `prefetch()` starts the next one's copy early.

    `wait_s` accumulates the seconds spent waiting for rows of `batches`: the training loop's
    data wait, which it reads and resets. Pinning and starting copies is not counted: on a GPU
    it overlaps the step's queued kernels.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], device: torch.device, channels_last: bool = False):
        self.batches = batches
        self.device = device
        self.channels_last = channels_last and device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait_s = 0.0
        self._ahead: tuple[dict[str, np.ndarray], DeviceBatch] | None = None
        self._ended = False

    def prefetch(self) -> None:
        """Fetch the next sub-batch and start moving it to the device, if not done already."""
        if self._ahead is None and not self._ended:
            self._ahead = self._load()
            self._ended = self._ahead is None

    def take(self) -> tuple[dict[str, np.ndarray], DeviceBatch] | None:
        """The next sub-batch as (numpy row, tensors on the device); None when the stream ended.

        The tensors are safe to use on the current CUDA stream.
        """
        self.prefetch()
        loaded, self._ahead = self._ahead, None
        if loaded is not None and self.copy_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.copy_stream)
            on_device = loaded[1]
            for tensor in (on_device.images, on_device.labels, *on_device.extras.values()):
                # Allocated on the copy stream, used on this one: without this, freeing them
                # could hand their memory to the next copy while this step still reads it.
                tensor.record_stream(current)
        return loaded

    def _load(self) -> tuple[dict[str, np.ndarray], DeviceBatch] | None:
        start = time.perf_counter()
        row = next(self.batches, None)
        self.wait_s += time.perf_counter() - start
        if row is None:
            return None
        if self.copy_stream is None:
            return row, self._convert(row)
        with torch.cuda.stream(self.copy_stream):
            return row, self._convert(row)

    def _convert(self, row: dict[str, np.ndarray]) -> DeviceBatch:
        images = self._to_device(row["images"][0]).float().div_(255)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return DeviceBatch(
            images=images,
            labels=self._to_device(row["labels"][0]),
            extras={
                key[len("extra_"):]: self._to_device(value[0])
                for key, value in row.items() if key.startswith("extra_")
            },
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.copy_stream is None:
            return tensor.to(self.device)
        # Pinned host memory makes the copy asynchronous; PyTorch's pinned-memory cache keeps
        # the buffer until the copy has finished.
        return tensor.pin_memory().to(self.device, non_blocking=True)
