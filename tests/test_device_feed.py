"""The device feed (what it yields, in which order, how far it reads ahead) and the embedding
loop built on it (the same embeddings as a plain forward, in order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.decoding import sub_batch_columns
from pipeline.device_feed import DeviceFeed, embed_rows


def _rows(count: int, size: int = 3) -> list[dict[str, np.ndarray]]:
    """Rows as `TrainBatchDecoder` yields them: one whole sub-batch per row (leading dim 1)."""
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


def _check(row, tensors, device):
    # images, labels and the extra_ columns without their prefix; ids and info_ stay in the row
    assert set(tensors) == {"images", "labels", "clusters"}
    assert tensors["images"].device.type == device.type
    assert tensors["images"].dtype == torch.float32
    expected = torch.from_numpy(row["images"][0]).double() / 255
    torch.testing.assert_close(tensors["images"].cpu().double(), expected, rtol=0, atol=1e-7)
    assert tensors["labels"].cpu().tolist() == row["labels"][0].tolist()
    assert tensors["clusters"].cpu().tolist() == row["extra_clusters"][0].tolist()


def test_yields_every_row_in_order_then_none():
    rows = _rows(4)
    feed = DeviceFeed(iter(rows), torch.device("cpu"), sub_batch_columns)
    for row in rows:
        loaded = feed.take()
        assert loaded is not None
        assert loaded[0] is row  # the numpy row travels with its tensors (ids for the refresh)
        _check(row, loaded[1], torch.device("cpu"))
    assert feed.take() is None
    assert feed.take() is None  # an ended stream stays ended


def test_reads_one_row_ahead_only_when_asked():
    source = _Counting(_rows(3))
    feed = DeviceFeed(source, torch.device("cpu"), sub_batch_columns)
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

    feed = DeviceFeed(Slow(_rows(2)), torch.device("cpu"), sub_batch_columns)
    feed.take()
    assert feed.take_wait_s() >= 0.05
    assert feed.take_wait_s() == 0.0  # handed over once
    feed.prefetch()
    assert feed.take_wait_s() >= 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the pinned copy on a side stream)")
def test_cuda_copies_ahead_on_a_side_stream_and_matches_the_cpu():
    device = torch.device("cuda", torch.cuda.current_device())
    rows = _rows(3, size=64)
    feed = DeviceFeed(iter(rows), device, sub_batch_columns, channels_last=True)
    loaded = feed.take()
    for i, row in enumerate(rows):
        feed.prefetch()  # the next copy overlaps this "step"
        step = loaded[1]["images"].sum() * 2  # work on the current stream reading the batch
        _check(row, loaded[1], device)
        assert loaded[1]["images"].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(step.cpu(), (torch.from_numpy(row["images"][0]).float() / 255).sum() * 2)
        loaded = feed.take()
        assert (loaded is None) == (i == len(rows) - 1)


def _embedding_case(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).to(device)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, size=(n, 3, 6, 6), dtype=np.uint8) for n in (4, 3, 4, 1)]
    model(torch.zeros(1, 3, 6, 6, device=device))  # materialise the lazy layer
    return model.eval(), batches


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_embed_rows_gives_each_rows_plain_forward_in_order(autocast):
    device = torch.device("cpu")
    model, batches = _embedding_case(device)
    with torch.no_grad():
        got = list(embed_rows(model, iter(batches), device, lambda images: images, autocast))
        assert [row is batch for (row, _), batch in zip(got, batches, strict=True)] == [True] * len(batches)
        for (_, out), batch in zip(got, batches, strict=True):
            images = torch.from_numpy(batch).float() / 255
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                expected = model(images).float()
            assert out.dtype == np.float32 and out.shape == (len(batch), 5)
            np.testing.assert_array_equal(out, expected.numpy())
    assert list(embed_rows(model, iter([]), device, lambda images: images)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (results read back a batch late)")
def test_embed_rows_on_cuda_equals_the_forward_run_batch_by_batch():
    device = torch.device("cuda", torch.cuda.current_device())
    model, batches = _embedding_case(device)
    batches = batches * 50  # enough batches that the late read-back and buffer reuse are exercised
    with torch.no_grad():
        got = [out for _, out in embed_rows(model, iter(batches), device, lambda images: images)]
        expected = [model(torch.from_numpy(b).to(device).float() / 255).cpu().numpy() for b in batches]
    for out, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
