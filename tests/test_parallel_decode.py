"""The refresh actor's decode of the whole training split (`decoded_batches`): in id order,
the same whatever the thread count, in several threads at once, one batch ahead at most."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from pipeline.data.decoding import decode_rgb, decoded_batches, eval_transform


def _jpegs(count: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_decode_the_same_batches_as_one(threads):
    images = _jpegs(23)
    transform = eval_transform(24, 28)

    def decode(i):
        return transform(decode_rgb(images[i])).numpy()

    serial = list(decoded_batches(decode, len(images), 5, threads=1))
    parallel = list(decoded_batches(decode, len(images), 5, threads=threads))
    assert [b.shape for b in serial] == [(5, 3, 24, 24)] * 4 + [(3, 3, 24, 24)]
    for one, many in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(one, many)
    expected = np.stack([transform(decode_rgb(data)).numpy() for data in images])
    np.testing.assert_array_equal(np.concatenate(parallel), expected)
    # From a later batch (what the refresh actor decodes past its kept ones): the same batches.
    tail = list(decoded_batches(decode, len(images), 5, threads=threads, start=10))
    assert len(tail) == 3
    for one, later in zip(serial[2:], tail, strict=True):
        np.testing.assert_array_equal(one, later)


def test_decodes_run_in_parallel_and_one_batch_ahead_at_most():
    batch, count = 4, 20
    lock = threading.Lock()
    running, most_running, started = 0, 0, []

    def decode(i):
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
            started.append(i)
        time.sleep(0.02)
        with lock:
            running -= 1
        return np.full(2, i)

    for k, out in enumerate(decoded_batches(decode, count, batch, threads=3)):
        np.testing.assert_array_equal(out[:, 0], np.arange(k * batch, min((k + 1) * batch, count)))
        with lock:
            assert max(started) < (k + 2) * batch, "decoded more than one batch ahead"
        time.sleep(0.1)  # a slow consumer (the model): decodes unbounded ahead would run on
    assert most_running > 1, "the decodes ran one at a time"
    assert list(decoded_batches(decode, 0, batch, threads=3)) == []
