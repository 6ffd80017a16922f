"""A training worker's side of the refresh actor: losses out, weights out, nothing waited on.

Every rank reports its step and the per-example losses of its own sub-batch, when the loss has
them (one step late, so a GPU copy never stalls the step); rank 0 also publishes its weights, notices a restarted actor from the
replies, saves the actor's state with each checkpoint and restores it on resume.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

REFRESH_STATE_FILE = "refresh_state.npz"


class RefreshLink:
    """Handle to the run's refresh actor from inside the training loop."""

    def __init__(self, plan, rank: int, device: torch.device):
        import ray

        self.actor = ray.get_actor(plan.refresh_actor)
        self.rank = rank
        self.device = device
        self.pending = None  # (step, ids, losses on CPU, copy-done event, index version)
        self.reply = None
        self.known_version = 0
        self.published_step = -1
        self.last_version = 0
        self.last_staleness = 0
        self._weights_ref = None  # kept alive until the actor has fetched it

    def after_step(self, step: int, batch: dict, per_example: torch.Tensor | None, inner) -> None:
        """Record the index version the step used and send the previous step's losses."""
        if "info_index_version" in batch:
            self.last_version = int(batch["info_index_version"][0])
            self.last_staleness = step - int(batch["info_index_step"][0])
        if self.pending is not None:
            self._send(*self.pending)
            self.pending = None
        if per_example is None:
            # Nothing to weight by (PDDM's pools), but the actor still needs the step: the
            # planners hold back relative to it.
            self.pending = (step + 1, np.zeros(0, dtype=np.int64), torch.zeros(0), None, self.last_version)
            return
        ids = batch["ids"][0]
        # The loss is computed on the gathered global batch, rank-major: this rank's slice.
        local = per_example[self.rank * len(ids) : (self.rank + 1) * len(ids)]
        event = None
        if local.is_cuda:
            local = local.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending = (step + 1, ids, local, event, self.last_version)

    def _send(self, step, ids, losses, event, version) -> None:
        if event is not None:
            event.synchronize()  # a step later: long finished
        ref = self.actor.record_losses.remote(step, ids, losses.numpy(), version, self.rank)
        if self.rank == 0:
            self.reply = ref

    def actor_needs_weights(self) -> bool:
        """Rank 0: whether the last reply came from an actor with no index and nothing to build
        it from (it was restarted). Never blocks."""
        import ray

        if self.reply is None:
            return False
        ready, _ = ray.wait([self.reply], timeout=0)
        if not ready:
            return False
        try:
            reply = ray.get(self.reply)
        except Exception:  # noqa: BLE001 - the actor died; its restart will say so in a later reply
            self.reply = None
            return False
        self.reply = None
        self.known_version = max(self.known_version, reply["version"])
        return bool(reply["needs_weights"])

    def publish(self, step: int, inner, confirm: bool = False, confirm_timeout_s: float = 60.0) -> bool:
        """Rank 0: hand the current weights (and Magnet's running sigma2) to the actor.

        Fire-and-forget during training. With `confirm` (at evaluation, which waits anyway)
        it waits until a live incarnation has accepted them, retrying while the actor
        restarts; False if none did in time.
        """
        import ray

        if step == self.published_step and not confirm:
            return True
        if step != self.published_step or self._weights_ref is None:
            state = {k: v.detach().to("cpu", copy=True) for k, v in inner.embedder.state_dict().items()}
            self._weights_ref = ray.put(state)
        sigma2 = float(getattr(inner.loss, "running_sigma2", 1.0))
        # A restarted actor numbers its indexes after the newest version this rank has seen.
        self.known_version = max(self.known_version, self.last_version)
        self.published_step = step
        if not confirm:
            self.actor.publish_weights.remote(step, [self._weights_ref], sigma2, self.known_version)
            return True
        deadline = time.monotonic() + confirm_timeout_s
        while True:
            try:
                ray.get(self.actor.publish_weights.remote(step, [self._weights_ref], sigma2, self.known_version))
                return True
            except Exception:  # noqa: BLE001 - restarting: try again shortly
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.5)

    def seen_accuracy(self, step: int, timeout_s: float = 600.0) -> float | None:
        """Rank 0 at evaluation: the seen-class accuracy of the index built from step `step`."""
        import ray

        try:
            summary = ray.get(self.actor.wait_for_index.remote(step, timeout_s))
        except Exception:  # noqa: BLE001 - a dead actor costs the metric, not the run
            return None
        return None if summary is None else summary["seen_accuracy"]

    def save(self, directory: str, step: int) -> None:
        """Rank 0: write the actor's index and per-example losses into the checkpoint of `step`."""
        import ray

        try:
            state = ray.get(self.actor.get_state.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - a restarting actor: the checkpoint goes without it
            return
        if state is None:
            return
        arrays = {f"index.{k}": np.asarray(v) for k, v in state["index"].items()}
        np.savez(
            Path(directory) / REFRESH_STATE_FILE, **arrays,
            example_loss=state["example_loss"], version=np.int64(state["version"]), step=np.int64(step),
        )

    def restore(self, directory: str) -> None:
        """Rank 0 on resume: give the actor the checkpoint's index and losses (it keeps its own
        if that is newer: the driver handed it this state already, or a worker-group restart
        within one run)."""
        import ray

        path = Path(directory) / REFRESH_STATE_FILE
        if not path.exists():
            return
        ray.get(self.actor.restore.remote(read_refresh_state(path)))


def read_refresh_state(source) -> dict:
    """The actor state saved by `RefreshLink.save`, from a path or a binary file object."""
    with np.load(source) as data:
        index = {k[len("index."):]: data[k] for k in data.files if k.startswith("index.")}
        for key in ("version", "model_step", "tag"):
            index[key] = int(index[key])
        index["built_at"] = float(index["built_at"])
        return {"index": index, "example_loss": data["example_loss"], "version": int(data["version"]),
                "step": int(data["step"]) if "step" in data.files else index["model_step"]}
