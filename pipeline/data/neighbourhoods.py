"""Magnet's neighbourhood batches: a seed cluster drawn by its loss, its nearest impostor
clusters, D examples from each (methods.md §1, "Neighbourhood sampling").

`sample_neighbourhoods` is the pure sampler. `NeighbourhoodPlanner` is the batch planner the
decode actors run: it reads the newest cluster index and seed weights from the refresh actor
through `ActorTables`, without ever waiting for a refresh, except for the very first index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.actor_tables import ActorTables
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
    index version was newest when the sub-batch was planned (recorded in `info`); `source`
    follows the refresh actor and keeps planning close to training.
    """

    source: ActorTables
    neighbourhoods: int
    clusters_per_neighbourhood: int
    examples_per_cluster: int
    num_ranks: int = 1
    """Sub-batches per training step: plan index i is trained at about step i // num_ranks."""
    seed: int = 0

    def plan(self, index: int) -> PlannedBatch:
        tables = self.source.current_tables(index // self.num_ranks)
        rng = np.random.default_rng([self.seed, index])
        ids, clusters = sample_neighbourhoods(
            tables, rng, self.neighbourhoods, self.clusters_per_neighbourhood, self.examples_per_cluster
        )
        return PlannedBatch(
            ids=ids,
            extras={"clusters": (np.int64(tables.tag) << TAG_SHIFT) | clusters},
            info={"index_version": tables.version, "index_step": tables.model_step},
        )
