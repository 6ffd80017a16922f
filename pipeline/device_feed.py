"""Batches put on the device one ahead, and embeddings brought back without waiting.

A copy from ordinary (pageable) host memory to a GPU makes the CPU wait until the GPU has
finished everything queued before it, and `.cpu()` of a result waits for the result: either
way the GPU runs idle while the next batch is prepared. Here each batch is pinned and copied
on a side CUDA stream while the previous one still computes, and results come back through
pinned memory, read one batch later. On a CPU there is nothing to overlap and both are plain
conversions. Used by the training step, the refresh actor's re-embedding and evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

Row = Any
"""One item of the source stream (a dict of numpy columns, or a uint8 image array)."""


class DeviceFeed:
    """Yields each row of `rows` with `columns(row)` on `device`; `prefetch()` starts the next
    row's copy early. The `images` column (uint8) arrives as float in [0, 1], [B, C, H, W]
    (channels_last memory when asked, on a GPU).

    The seconds spent waiting for rows are the caller's data wait: `take_wait_s()` hands them
    over. Pinning and starting copies is not counted: on a GPU it overlaps queued kernels.
    """

    def __init__(
        self,
        rows: Iterable[Row],
        device: torch.device,
        columns: Callable[[Row], dict[str, np.ndarray]],
        channels_last: bool = False,
    ):
        self.rows = iter(rows)
        self.device = device
        self.columns = columns
        self.channels_last = channels_last and device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._wait_s = 0.0
        self._ahead: tuple[Row, dict[str, torch.Tensor]] | None = None
        self._ended = False

    def prefetch(self) -> None:
        """Fetch the next row and start moving it to the device, if not done already."""
        if self._ahead is None and not self._ended:
            self._ahead = self._load()
            self._ended = self._ahead is None

    def take(self) -> tuple[Row, dict[str, torch.Tensor]] | None:
        """The next row and its tensors on the device; None when the rows have ended.

        The tensors are safe to use on the current CUDA stream.
        """
        self.prefetch()
        loaded, self._ahead = self._ahead, None
        if loaded is not None and self.copy_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.copy_stream)
            for tensor in loaded[1].values():
                # Allocated on the copy stream, used on this one: without this, freeing them
                # could hand their memory to the next copy while this step still reads it.
                tensor.record_stream(current)
        return loaded

    def take_wait_s(self) -> float:
        """The seconds spent waiting for rows since the last call."""
        wait_s, self._wait_s = self._wait_s, 0.0
        return wait_s

    def _load(self) -> tuple[Row, dict[str, torch.Tensor]] | None:
        start = time.perf_counter()
        row = next(self.rows, None)
        self._wait_s += time.perf_counter() - start
        if row is None:
            return None
        if self.copy_stream is None:
            return row, self._convert(row)
        with torch.cuda.stream(self.copy_stream):
            return row, self._convert(row)

    def _convert(self, row: Row) -> dict[str, torch.Tensor]:
        tensors = {name: self._to_device(array) for name, array in self.columns(row).items()}
        if "images" in tensors:
            images = tensors["images"].float().div_(255)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            tensors["images"] = images
        return tensors

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.copy_stream is None:
            return tensor.to(self.device)
        # Pinned host memory makes the copy asynchronous; PyTorch's pinned-memory cache keeps
        # the buffer until the copy has finished.
        return tensor.pin_memory().to(self.device, non_blocking=True)


def granted_device(gpu_ids: list, cuda_available: bool) -> torch.device:
    """A Ray actor's torch device: the GPU Ray gave it (`ray.get_gpu_ids()`), else the CPU. A GPU
    it merely sees belongs to someone else: Ray does not hide a node's GPUs from an actor that
    asked for none, and using one would take memory and time promised to another process (a
    Train worker, another embedding actor)."""
    return torch.device("cuda" if gpu_ids and cuda_available else "cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast precision of every forward pass on `device`: bfloat16 on a GPU, none (float32)
    on the CPU. Training, its evaluation, the refresh actor and `jobs.evaluate` / export all
    ask here, so a checkpoint's embeddings are the same numbers wherever they are computed."""
    return torch.bfloat16 if device.type == "cuda" else None


def embed_rows(
    model: torch.nn.Module,
    rows: Iterable[Row],
    device: torch.device,
    images_of: Callable[[Row], np.ndarray],
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[tuple[Row, np.ndarray]]:
    """(row, float32 embeddings of `images_of(row)`) for every row, in order.

    The next row's images cross to the device while this one's forward runs, and each result
    is read a batch later, so the loop never waits for the GPU to finish the batch it has just
    queued. Grad mode and `model.eval()` are the caller's.
    """
    feed = DeviceFeed(rows, device, columns=lambda row: {"images": images_of(row)})
    pending = None
    while (loaded := feed.take()) is not None:
        row, tensors = loaded
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(tensors["images"])
        out = out.float()
        event = None
        if out.is_cuda:
            out = out.to("cpu", non_blocking=True)  # into pinned memory: nothing waits here
            event = torch.cuda.Event()
            event.record()
        feed.prefetch()  # after the forward is queued: the wait for the next row overlaps it
        if pending is not None:
            yield _arrived(*pending)
        pending = (row, out, event)
    if pending is not None:
        yield _arrived(*pending)


def _arrived(row: Row, out: torch.Tensor, event) -> tuple[Row, np.ndarray]:
    if event is None:
        return row, out.numpy()
    event.synchronize()
    # A copy: the pinned buffer goes back to PyTorch's cache when `out` is freed.
    return row, out.numpy().copy()
