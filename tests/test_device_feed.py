"""The training loop's device feed: what it yields, in which order, and how far it reads ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.training.device_feed import DeviceFeed


def _rows(count: int, size: int = 3) -> list[dict[str, np.ndarray]]:
    """Rows as the training stream yields them: one whole sub-batch per row (leading dim 1)."""
    rng = np.random.default_rng(0)
    return [
        {
            "images": rng.integers(0, 256, size=(1, size, 3, 4, 4), dtype=np.uint8),
            "labels": np.arange(size, dtype=np.int64)[None] + 10 * i,
            "ids": np.arange(size, dtype=np.int64)[None] + 100 * i,
            "extra_clusters": np.full((1, size), i, dtype=np.int64),
            "info_index_version": np.array([i]),
        }
        for i in range(count)
    ]


class _Counting:
    """An iterator over rows that counts how many were read."""

    def __init__(self, rows):
        self.rows = iter(rows)
        self.read = 0

    def __iter__(self):
        return self

    def __next__(self):
        row = next(self.rows)
        self.read += 1
        return row


def _check(row, on_device, device):
    assert on_device.images.device.type == device.type
    assert on_device.images.dtype == torch.float32
    expected = torch.from_numpy(row["images"][0]).double() / 255
    torch.testing.assert_close(on_device.images.cpu().double(), expected, rtol=0, atol=1e-7)
    assert on_device.labels.cpu().tolist() == row["labels"][0].tolist()
    assert set(on_device.extras) == {"clusters"}  # extra_ columns only, prefix dropped
    assert on_device.extras["clusters"].cpu().tolist() == row["extra_clusters"][0].tolist()


def test_yields_every_row_in_order_then_none():
    rows = _rows(4)
    feed = DeviceFeed(iter(rows), torch.device("cpu"))
    for row in rows:
        loaded = feed.take()
        assert loaded is not None
        assert loaded[0] is row  # the numpy row travels with its tensors (ids for the refresh)
        _check(row, loaded[1], torch.device("cpu"))
    assert feed.take() is None
    assert feed.take() is None  # an ended stream stays ended


def test_reads_one_row_ahead_only_when_asked():
    source = _Counting(_rows(3))
    feed = DeviceFeed(source, torch.device("cpu"))
    first = feed.take()
    assert source.read == 1  # take() alone never reads past the row it returns
    feed.prefetch()
    feed.prefetch()  # a second call before take() reads nothing more
    assert source.read == 2
    second = feed.take()
    assert source.read == 2 and second[0]["labels"][0][0] == 10
    assert first[0]["labels"][0][0] == 0
    feed.take()
    feed.prefetch()  # at the end of the stream: nothing to read, and no error
    assert feed.take() is None and source.read == 3


def test_counts_the_time_spent_reading():
    class Slow(_Counting):
        def __next__(self):
            import time

            time.sleep(0.05)
            return super().__next__()

    feed = DeviceFeed(Slow(_rows(2)), torch.device("cpu"))
    feed.take()
    assert feed.wait_s >= 0.05
    feed.wait_s = 0.0
    feed.prefetch()
    assert feed.wait_s >= 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the pinned copy on a side stream)")
def test_cuda_copies_ahead_on_a_side_stream_and_matches_the_cpu():
    device = torch.device("cuda", torch.cuda.current_device())
    rows = _rows(3, size=64)
    feed = DeviceFeed(iter(rows), device, channels_last=True)
    loaded = feed.take()
    for i, row in enumerate(rows):
        feed.prefetch()  # the next copy overlaps this "step"
        step = loaded[1].images.sum() * 2  # work on the current stream reading the batch
        _check(row, loaded[1], device)
        assert loaded[1].images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(step.cpu(), (torch.from_numpy(row["images"][0]).float() / 255).sum() * 2)
        loaded = feed.take()
        assert (loaded is None) == (i == len(rows) - 1)
