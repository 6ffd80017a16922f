"""One job at a time per run. A second job given the same run name while the first trains (the
same command started twice, a `train.run_name` reused) would train into the same checkpoint
folder and MLflow run. With local storage the driver holds an exclusive lock on a file beside
the runs while it trains; the system frees it when the process ends, however it ends, so a
rerun after a crash is never locked out. Object-store storage has no such lock (see
docs/cluster.md)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

LOCK_DIR = ".run-locks"
"""Folder of the lock files, under the (local) `train.storage_path`."""


@contextlib.contextmanager
def run_lock(storage_path: str, run_name: str):
    """Hold run `run_name`'s lock for the `with` block; ValueError naming `train.run_name` and
    the holder when another process holds it. A no-op for URI storage."""
    if "://" in storage_path:
        yield
        return
    directory = Path(storage_path) / LOCK_DIR
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{run_name}.lock", "a+") as handle:  # noqa: PTH123 - a lock file
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"train.run_name: run {run_name!r} is being trained by {holder}; wait for it to "
                f"end (or stop it) before running it again, or choose another train.run_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield  # the lock goes with the file's closing
