"""Magnet's neighbourhood batches: a seed cluster drawn by its loss, its nearest impostor
clusters, D examples from each (methods.md §1, "Neighbourhood sampling").

`sample_neighbourhoods` is the pure sampler. `NeighbourhoodPlanner` is the batch planner the
decode actors run: it reads the newest cluster index and seed weights from the refresh actor
(found by name) without ever waiting for a refresh, except for the very first index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.planning import PlannedBatch

# Cluster ids in a batch carry their index's random tag in the high bits: sub-batches planned
# from different indexes can meet in one global batch, and cluster 17 of one index is not
# cluster 17 of the next. Equal ids mean the same cluster of the same index. A random tag
# rather than the version number, because a restarted actor cannot know which version numbers
# its previous incarnation handed out.
TAG_SHIFT = 32


@dataclass
class PlanTables:
    """What the sampler reads from one index version (a subset of `ClusterIndex`) plus the
    seed weights the refresh actor derived from the latest per-example losses."""

    version: int
    model_step: int
    tag: int
    """Random 31-bit identity of the index (see TAG_SHIFT)."""
    members: np.ndarray
    offsets: np.ndarray
    cluster_class: np.ndarray
    impostors: np.ndarray
    weights: np.ndarray
    """Seed probability of each cluster (sums to 1)."""
    weights_stamp: int = 0
    """Changes whenever `weights` does."""


def sample_neighbourhoods(
    tables: PlanTables, rng: np.random.Generator, count: int, clusters_per_neighbourhood: int, examples_per_cluster: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` neighbourhoods of M clusters x D examples -> (ids, cluster of each id).

    Seed clusters are drawn with probability `tables.weights`; a neighbourhood is its seed and
    the seed's M - 1 nearest other-class clusters; D members of each are drawn uniformly,
    with replacement only when the cluster has fewer than D members.
    """
    m, d = clusters_per_neighbourhood, examples_per_cluster
    if tables.impostors.shape[1] < m - 1:
        raise ValueError(
            f"the index lists {tables.impostors.shape[1]} impostors per cluster; a neighbourhood needs {m - 1}"
        )
    seeds = rng.choice(len(tables.weights), size=count, p=tables.weights)
    ids = np.empty((count, m, d), dtype=np.int64)
    clusters = np.empty((count, m), dtype=np.int64)
    for n, seed in enumerate(seeds):
        clusters[n, 0] = seed
        clusters[n, 1:] = tables.impostors[seed, : m - 1]
        for j, cluster in enumerate(clusters[n]):
            members = tables.members[tables.offsets[cluster] : tables.offsets[cluster + 1]]
            ids[n, j] = rng.choice(members, d, replace=len(members) < d)
    return ids.reshape(-1), np.repeat(clusters.reshape(-1), d)


@dataclass
class NeighbourhoodPlanner:
    """Batch planner of Magnet: `neighbourhoods` whole neighbourhoods per sub-batch.

    Plans are seeded by (seed, plan index) but follow the model, so they depend on which
    index version was newest when the sub-batch was planned (recorded in `info`). Ray Data
    would plan as far ahead as its buffers allow, which would make every plan stale; the
    planner therefore stays at most `max_ahead_steps` steps ahead of the newest step the ranks
    reported to the refresh actor, waiting otherwise (this waits in the decode actor, while
    training consumes the batches already made).
    """

    actor_name: str
    neighbourhoods: int
    clusters_per_neighbourhood: int
    examples_per_cluster: int
    num_ranks: int = 1
    """Sub-batches per training step: plan index i is trained at about step i // num_ranks."""
    seed: int = 0
    max_ahead_steps: int = 8
    poll_seconds: float = 0.5
    """How often to ask the refresh actor for a newer index or newer seed weights."""
    first_index_timeout_s: float = 1800.0
    """How long the very first plan waits for the initial index (embedding the whole set)."""
    max_wait_s: float = 120.0
    """Longest wait for training to catch up; then plan anyway (never a deadlock)."""
    unanswered_s: float = 2.0
    """A request unanswered this long means the actor is down (restarting): stop holding back."""
    _tables: PlanTables | None = field(default=None, init=False, repr=False)
    _pending: object = field(default=None, init=False, repr=False)
    _last_poll: float = field(default=0.0, init=False, repr=False)
    _latest_step: int = field(default=0, init=False, repr=False)
    _actor_down: bool = field(default=False, init=False, repr=False)
    _actor: object = field(default=None, init=False, repr=False)

    def __getstate__(self):
        # Pickled to the decode actors by name only; each one looks the actor up itself.
        state = dict(self.__dict__)
        state.update(_tables=None, _pending=None, _last_poll=0.0, _latest_step=0, _actor_down=False, _actor=None)
        return state

    def plan(self, index: int) -> PlannedBatch:
        tables = self.current_tables(index // self.num_ranks)
        rng = np.random.default_rng([self.seed, index])
        ids, clusters = sample_neighbourhoods(
            tables, rng, self.neighbourhoods, self.clusters_per_neighbourhood, self.examples_per_cluster
        )
        return PlannedBatch(
            ids=ids,
            extras={"clusters": (np.int64(tables.tag) << TAG_SHIFT) | clusters},
            info={"index_version": tables.version, "index_step": tables.model_step},
        )

    def current_tables(self, step: int = 0) -> PlanTables:
        """The newest tables received for planning training step `step`. Blocks until the very
        first index exists, and while `step` is too far ahead of training."""
        import ray

        if self._actor is None:
            self._actor = ray.get_actor(self.actor_name)
        if self._tables is None:
            reply = ray.get(self._actor.plan_tables.remote(-1, -1, -1, True), timeout=self.first_index_timeout_s)
            self._accept(reply)
            self._last_poll = time.monotonic()
        deadline = time.monotonic() + self.max_wait_s
        self._poll(self.poll_seconds)
        # Holding back relies on the actor hearing the ranks' steps. While it is down, or
        # restarted and not yet told (their reports to the dead incarnation are lost), plan
        # on: otherwise training would wait for plans that wait for training.
        while (
            step > self._latest_step + self.max_ahead_steps
            and not self._actor_down
            and time.monotonic() < deadline
        ):
            # Training is behind: check for its progress often, without spinning.
            time.sleep(0.02)
            self._poll(0.1)
        return self._tables

    def _poll(self, interval: float) -> None:
        """Take a finished reply if there is one and ask again when `interval` has passed
        since the last request; never blocks."""
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                try:
                    self._accept(ray.get(self._pending))
                except Exception:  # noqa: BLE001 - the actor died or is restarting: keep the last plan
                    self._actor_down = True
                self._pending = None
            elif time.monotonic() - self._last_poll > self.unanswered_s:
                self._actor_down = True
        if self._pending is None and time.monotonic() - self._last_poll >= interval:
            self._request()

    def _request(self) -> None:
        self._last_poll = time.monotonic()
        t = self._tables
        version, tag, stamp = (-1, -1, -1) if t is None else (t.version, t.tag, t.weights_stamp)
        self._pending = self._actor.plan_tables.remote(version, tag, stamp, False)

    def _accept(self, reply: dict) -> None:
        # A restarted actor reports step 0 until the ranks report again: keep the maximum,
        # and count the actor as down until it has caught up.
        self._actor_down = reply["latest_step"] < self._latest_step
        self._latest_step = max(self._latest_step, reply["latest_step"])
        if reply["tables"] is not None:
            self._tables = reply["tables"]
        elif reply["weights"] is not None and self._tables is not None:
            tag, weights, stamp = reply["weights"]
            if tag == self._tables.tag:
                self._tables.weights, self._tables.weights_stamp = weights, stamp
