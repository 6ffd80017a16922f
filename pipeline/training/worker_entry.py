"""What the driver hands Ray Train: the worker entry point and the `RunPlan`, in a module that
imports almost nothing.

Ray pickles the entry point by reference, so every process that unpickles it imports this
module: the Train controller too, which never calls it. The loop (torch, torchvision, the
losses, evaluation) is imported by the workers only, when they run it: importing it took the
controller 2.5 s of a run's start on a 2-core VM.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class RunPlan:
    """What the driver decided that every worker needs to know (picklable)."""

    run_id: str
    tracking_uri: str
    run_name: str
    num_classes: int
    steps_per_epoch: int
    total_steps: int
    progress_queue: object = None
    refresh_actor: str = ""
    """Name of the run's refresh actor; empty when the batches do not follow the model."""
    refresh_every_steps: int = 0
    """Rank 0 publishes its weights for a refresh every this many steps."""
    seen_holdout_ids: np.ndarray | None = None
    """Training-split ids held out of training for the seen-class accuracy (dataset "seen" is
    the whole training split, decoded for evaluation); None when nothing is held out."""
    stream_start_step: int = 0
    """The step whose sub-batches the training stream starts with (the driver's resume step)."""
    gallery_split: str = ""
    """When set, test images are queries ranked against this split (dataset "gallery")."""
    dataset_fingerprint: str = ""
    """The training dataset's fingerprint, saved with each checkpoint: what a resume compares."""

    @property
    def has_seen_holdout(self) -> bool:
        """Whether part of the training classes is held out for the seen-class accuracy."""
        return self.seen_holdout_ids is not None and len(self.seen_holdout_ids) > 0


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train entry point: `payload` holds the resolved config dict and the `RunPlan`."""
    import ray.train

    from pipeline.config import config_from_dict

    config = config_from_dict(payload["config"])
    plan: RunPlan = payload["plan"]
    rows = None
    if not plan.refresh_actor or ray.train.get_checkpoint() is None:
        # The first sub-batch needs Ray Data's split coordinator and a decode actor, a process
        # each that imports torch: 6-7 s on a 2-core VM. Ask for it now, so they start while
        # this worker imports the loop and builds its model. A resumed stream that follows the
        # model starts in the loop instead: its lagged planners must not ask the refresh actor
        # for an index before rank 0 has published its resumed weights.
        rows = FetchedAhead(train_rows(config, plan, ray.train.get_context().get_world_rank()))
    from pipeline.training.loop import run_worker

    run_worker(config, plan, rows)


def train_rows(config, plan: RunPlan, rank: int):
    """Rank `rank`'s training stream: one decoded sub-batch per row, in plan order."""
    import ray.train

    # Planners that follow the model give each rank its own stream (see ray_datasets).
    stream = f"train_{rank}" if plan.refresh_actor else "train"
    return ray.train.get_dataset_shard(stream).iter_batches(
        batch_size=1, batch_format="numpy", prefetch_batches=config.data.prefetch_batches
    )


class FetchedAhead:
    """An iterator over `rows` whose first item is fetched by a background thread from the
    moment it is made; the rest are fetched by the caller, as usual. An error raised while
    fetching the first item is raised by the first `next()`."""

    _END = object()

    def __init__(self, rows):
        self._rows = iter(rows)
        self._first = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch_first, name="first-sub-batch", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first = next(self._rows, self._END)
        except BaseException as error:  # re-raised in the caller's thread
            self._error = error

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            first, self._first = self._first, None
            if first is self._END:
                raise StopIteration
            return first
        return next(self._rows)
