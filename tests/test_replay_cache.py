"""ReplayCache: decoded batches kept for later passes only when they all fit."""

from __future__ import annotations

import numpy as np

from pipeline.data.decoding import ReplayCache


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
