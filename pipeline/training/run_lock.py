"""One job at a time per run. A second job given the same run name while the first trains (the
same command started twice, a `train.run_name` reused) would train into the same checkpoint
folder and MLflow run, so the driver holds the run's lock (`pipeline.locks`) while it trains:
a file lock with local storage, a lease with `s3://` storage."""

from __future__ import annotations

from pipeline import locks

LOCK_DIR = ".run-locks"
"""Folder of the run locks, under `train.storage_path`."""


def run_lock(storage_path: str, run_name: str, **options):
    """Hold run `run_name`'s lock for a `with` block; ValueError naming `train.run_name` and the
    holder when another process holds it. `options`: those of `locks.exclusive`."""
    return locks.exclusive(
        f"{storage_path}/{LOCK_DIR}",
        run_name,
        lambda holder: (
            f"train.run_name: run {run_name!r} is being trained by {holder}; wait for it to end "
            f"(or stop it) before running it again, or choose another train.run_name"
        ),
        **options,
    )


def run_lock_file(storage_path: str, run_name: str) -> str | None:
    """The file `run_lock` locks with local storage (None with an object store)."""
    return locks.lock_file(f"{storage_path}/{LOCK_DIR}", run_name)
