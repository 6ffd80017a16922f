"""ReplayCache: decoded batches kept for later passes only when they all fit (Ray Data streams,
which cannot start part-way). PrefixCache: the first batches that fit are kept, and later passes
stream only the rest (the refresh actor's decode, which can start at any batch)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.decoding import PrefixCache, ReplayCache


def _counting_stream(calls):
    def stream():
        calls.append(1)
        for i in range(3):
            yield {"image": np.full(10, i, dtype=np.uint8)}
    return stream


def test_batches_that_fit_are_replayed_without_streaming_again():
    calls: list = []
    cache = ReplayCache(limit_bytes=30)
    first = list(cache.batches(_counting_stream(calls)))
    second = list(cache.batches(_counting_stream(calls)))
    assert len(calls) == 1
    assert [b["image"][0] for b in second] == [0, 1, 2] == [b["image"][0] for b in first]


def test_batches_over_the_limit_are_streamed_every_time():
    calls: list = []
    cache = ReplayCache(limit_bytes=25)
    assert len(list(cache.batches(_counting_stream(calls)))) == 3
    assert len(list(cache.batches(_counting_stream(calls)))) == 3
    assert len(calls) == 2 and cache.kept is None


def _resumable_stream(starts, count=5, size=10):
    """stream(start): batches start .. count - 1 of `size` bytes, batch i filled with i."""
    def stream(start):
        starts.append(start)
        for i in range(start, count):
            yield np.full(size, i, dtype=np.uint8)
    return stream


@pytest.mark.parametrize(("limit", "kept", "later_starts"), [
    (50, 5, []),  # all fit: later passes stream nothing
    (49, 4, [4]),
    (25, 2, [2]),  # the first two fit: later passes decode only batches 2-4
    (9, 0, [0]),  # none fits: every pass streams everything
])
def test_the_first_batches_that_fit_are_replayed_and_the_rest_streamed(limit, kept, later_starts):
    starts: list = []
    cache = PrefixCache(limit)
    passes = [[int(b[0]) for b in cache.batches(_resumable_stream(starts))] for _ in range(3)]
    assert passes == [[0, 1, 2, 3, 4]] * 3
    assert [int(b[0]) for b in cache.kept] == list(range(kept)) and cache.kept_bytes == 10 * kept
    assert starts == [0] + later_starts * 2
    assert cache.whole == (kept == 5)


def test_the_kept_batches_stay_a_prefix():
    """A batch that does not fit ends the prefix: a smaller one after it is not kept, since a
    later pass streams from the first batch not kept."""
    def stream(start):
        yield from [np.zeros(10, np.uint8), np.ones(30, np.uint8), np.full(5, 2, np.uint8)][start:]

    cache = PrefixCache(limit_bytes=20)
    assert [int(b[0]) for b in cache.batches(stream)] == [0, 1, 2]
    assert [int(b[0]) for b in cache.kept] == [0] and not cache.whole
    assert [int(b[0]) for b in cache.batches(stream)] == [0, 1, 2]
    assert [int(b[0]) for b in cache.kept] == [0]


def test_a_pass_cut_short_keeps_its_prefix_and_the_next_goes_on_from_it():
    starts: list = []
    cache = PrefixCache(limit_bytes=30)
    first = cache.batches(_resumable_stream(starts))
    assert int(next(first)[0]) == 0
    first.close()  # (the refresh failed part-way)
    assert [int(b[0]) for b in cache.batches(_resumable_stream(starts))] == [0, 1, 2, 3, 4]
    assert [int(b[0]) for b in cache.kept] == [0, 1, 2]
    assert [int(b[0]) for b in cache.batches(_resumable_stream(starts))] == [0, 1, 2, 3, 4]
    assert starts == [0, 1, 3]
