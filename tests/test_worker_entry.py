"""The Train workers' entry module: light to import, as the decoding module is (processes that
only unpickle them import them too), and `FetchedAhead`, which asks for a worker's first
sub-batch while the worker still starts."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from pipeline.training.worker_entry import FetchedAhead


def test_the_first_item_is_fetched_before_anyone_asks_for_it():
    asked = threading.Event()
    release = threading.Event()

    def rows():
        asked.set()
        release.wait(timeout=10)
        yield from range(5)

    ahead = FetchedAhead(rows())
    assert asked.wait(timeout=10), "nothing asked the source for its first item"
    release.set()
    assert list(ahead) == [0, 1, 2, 3, 4]


def test_an_empty_source_ends_and_an_error_fetching_the_first_item_reaches_the_caller():
    assert list(FetchedAhead(iter(()))) == []

    def broken():
        raise OSError("shard unreadable")
        yield  # pragma: no cover - makes this a generator

    ahead = FetchedAhead(broken())
    with pytest.raises(OSError, match="shard unreadable"):
        next(ahead)


@pytest.mark.parametrize(
    "module",
    [
        "pipeline.training.worker_entry",  # the Train controller unpickles the worker function and RunPlan
        "pipeline.data.decoding",  # Ray Data's split coordinator unpickles the decode actors' class
    ],
)
def test_modules_unpickled_by_processes_that_never_run_them_import_no_torch(module):
    code = (f"import sys, {module}; print(sorted(m for m in "
            "('torch', 'torchvision', 'sklearn', 'pipeline.training.loop') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
