"""The Magnet cluster index over the full training set, built with faiss.

Per class, k-means with K clusters on the embeddings of that class's training examples (a class
with K or fewer examples gets one cluster per example, as methods.md asks); then, for every
cluster, its nearest centroids of *other* classes (the impostor table the neighbourhood sampler
reads). Cluster ids are dense 0..num_clusters-1, class-major.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from pipeline.exact_search import faiss_gpu_count, faiss_kmeans, flat_l2_index

# Per-class k-means on the GPU only pays off for large classes: a GPU launch costs more than
# clustering a few hundred points on the CPU.
GPU_KMEANS_MIN_POINTS = 20_000


@dataclass
class ClusterIndex:
    """One version of the cluster index (everything numpy, cheap to ship between processes)."""

    version: int
    """Increases by one with every index the refresh actor publishes."""
    model_step: int
    """Training step of the weights the embeddings came from (0 = the initial model)."""
    tag: int
    """Random 31-bit identity, unique across actor restarts (versions may not be)."""
    built_at: float
    """Unix time the index was finished."""
    centroids: np.ndarray
    """[num_clusters, dim] float32."""
    cluster_class: np.ndarray
    """[num_clusters] int64 class (remapped label) of each cluster."""
    assignment: np.ndarray
    """[num_examples] int64 cluster of each example id; -1 for ids not clustered (held out)."""
    members: np.ndarray
    """Clustered example ids sorted by cluster: cluster k's ids are members[offsets[k]:offsets[k+1]]."""
    offsets: np.ndarray
    """[num_clusters + 1] int64."""
    impostors: np.ndarray
    """[num_clusters, num_impostors] int64: nearest other-class clusters, nearest first."""

    @property
    def num_clusters(self) -> int:
        """Clusters over all classes."""
        return len(self.cluster_class)

    def cluster_members(self, cluster: int) -> np.ndarray:
        """Example ids of `cluster`."""
        return self.members[self.offsets[cluster] : self.offsets[cluster + 1]]

    @property
    def cluster_sizes(self) -> np.ndarray:
        """Members per cluster."""
        return np.diff(self.offsets)


def kmeans_assign(points: np.ndarray, k: int, *, seed: int, niter: int = 20, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means of `points` [n, d] into at most k clusters -> (centroids, assignment).

    With n <= k every point is its own cluster. Clusters left empty by the final assignment
    (possible with duplicate points) are dropped, so every returned cluster has members.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    n, dim = points.shape
    if n <= k:
        return points.copy(), np.arange(n, dtype=np.int64)
    kmeans = faiss_kmeans(
        dim, k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
        on_gpu=bool(use_gpu and n >= GPU_KMEANS_MIN_POINTS and faiss_gpu_count() > 0),
    )
    kmeans.train(points)
    _, assignment = kmeans.index.search(points, 1)
    assignment = assignment[:, 0].astype(np.int64)
    used = np.unique(assignment)
    if len(used) < k:
        remap = np.full(k, -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return kmeans.centroids[used].copy(), remap[assignment]
    return kmeans.centroids.copy(), assignment


def nearest_other_class(centroids: np.ndarray, cluster_class: np.ndarray, count: int, use_gpu: bool = False) -> np.ndarray:
    """[num_clusters, count]: for each centroid, the `count` nearest centroids of another class.

    Exact (faiss flat L2, or torch's on a GPU faiss cannot use: pipeline.exact_search). A class
    owns at most `max_same` clusters, so searching
    count + max_same neighbours always leaves at least `count` of other classes.
    """
    num = len(cluster_class)
    if count == 0:
        return np.zeros((num, 0), dtype=np.int64)
    _, same_counts = np.unique(cluster_class, return_counts=True)
    others_min = num - same_counts.max()
    if others_min < count:
        raise ValueError(
            f"the cluster index has {num} clusters; a class owning {same_counts.max()} of them leaves "
            f"{others_min} clusters of other classes, fewer than the {count} impostors a neighbourhood needs"
        )
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k = min(num, count + int(same_counts.max()))
    _, neighbours = flat_l2_index(centroids, use_gpu=use_gpu, k=k).search(centroids, k)
    out = np.empty((num, count), dtype=np.int64)
    for cluster in range(num):
        row = neighbours[cluster]
        row = row[(row >= 0) & (cluster_class[row] != cluster_class[cluster])]
        out[cluster] = row[:count]
    return out


def build_cluster_index(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    clusters_per_class: int,
    num_impostors: int,
    version: int,
    model_step: int,
    seed: int = 0,
    use_gpu: bool = False,
    niter: int = 20,
    seed_round: int | None = None,
) -> tuple[ClusterIndex, float]:
    """Cluster every class of `embeddings` [N, d] (ids are row positions; label -1 = skip).

    k-means is seeded by `seed`, the class and `seed_round` (default: `version`), so each
    refresh starts from other points. Returns the index and the seconds spent in clustering
    (k-means plus the impostor search).
    """
    seed_round = version if seed_round is None else seed_round
    start = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    centroid_parts, class_parts = [], []
    next_cluster = 0
    # The ids of each class from one stable sort (ascending within a class, as a scan of the
    # labels per class would give them, at O(N log N) instead of O(N x classes)).
    by_class = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[by_class], return_index=True)
    ends = np.append(starts[1:], len(labels))
    for cls, begin, end in zip(classes.tolist(), starts.tolist(), ends.tolist(), strict=True):
        if cls < 0:
            continue
        ids = by_class[begin:end]
        # A different k-means seed per class and refresh, so restarts are not correlated.
        centroids, local = kmeans_assign(
            embeddings[ids], clusters_per_class, seed=int(seed * 1_000_003 + cls + seed_round * 7919) % (2**31),
            niter=niter, use_gpu=use_gpu,
        )
        assignment[ids] = local + next_cluster
        centroid_parts.append(centroids)
        class_parts.append(np.full(len(centroids), cls, dtype=np.int64))
        next_cluster += len(centroids)
    centroids = np.concatenate(centroid_parts).astype(np.float32)
    cluster_class = np.concatenate(class_parts)
    clustered = np.flatnonzero(assignment >= 0)
    order = clustered[np.argsort(assignment[clustered], kind="stable")]
    counts = np.bincount(assignment[clustered], minlength=next_cluster)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    impostors = nearest_other_class(centroids, cluster_class, num_impostors, use_gpu=use_gpu)
    index = ClusterIndex(
        version=version, model_step=model_step, tag=int.from_bytes(os.urandom(4), "little") >> 1,
        built_at=time.time(), centroids=centroids,
        cluster_class=cluster_class, assignment=assignment, members=order.astype(np.int64),
        offsets=offsets, impostors=impostors,
    )
    return index, time.perf_counter() - start


def cluster_seed_weights(example_loss: np.ndarray, assignment: np.ndarray, num_clusters: int, floor: float) -> np.ndarray:
    """Seed probabilities of the clusters, proportional to their recent loss (methods.md §1).

    A cluster's loss is the mean of its members' most recent per-example losses (NaN =
    never measured, ignored). A cluster with no measured member gets the mean loss of the
    measured clusters. Every weight is at least `floor` x that mean, so none is 0; if nothing
    has been measured, or every loss is 0, the draw is uniform. Never NaN.
    """
    return ClusterLosses(example_loss, assignment, num_clusters).seed_weights(floor)


class ClusterLosses:
    """Each cluster's sum and count of its members' measured losses, kept up to date one
    sub-batch at a time, so `cluster_seed_weights` costs O(clusters) rather than a pass over
    every example (the refresh actor answers a planner's poll with them several times a step:
    about 20 ms a time at 1M examples, benchmarks/planner_costs.py)."""

    def __init__(self, example_loss: np.ndarray, assignment: np.ndarray, num_clusters: int):
        """Totals of `example_loss` [N] (NaN = not measured) over `assignment` [N] (-1 = none)."""
        self.assignment = assignment
        clustered = assignment >= 0
        loss = example_loss[clustered]
        cluster = assignment[clustered]
        measured = np.isfinite(loss)
        # float64 even when nothing is measured yet (bincount of nothing is int64).
        self.sums = np.bincount(cluster[measured], weights=loss[measured], minlength=num_clusters).astype(np.float64)
        self.counts = np.bincount(cluster[measured], minlength=num_clusters).astype(np.int64)
        # Losses other than 0 per cluster: where none is left, the sum is 0 exactly, not the
        # rounding its additions and subtractions leave (a hinge loss is often exactly 0, and
        # a sum of +-1e-17 would turn the uniform draw of a converged run into noise).
        self.nonzero = np.bincount(cluster[measured & (loss != 0)], minlength=num_clusters).astype(np.int64)

    def replace(self, ids: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """Examples `ids` (distinct) change loss from `old` to `new` (NaN = not measured)."""
        cluster = self.assignment[ids]
        for losses, sign in ((old, -1), (new, 1)):
            counted = (cluster >= 0) & np.isfinite(losses)
            np.add.at(self.sums, cluster[counted], sign * losses[counted].astype(np.float64))
            np.add.at(self.counts, cluster[counted], sign)
            np.add.at(self.nonzero, cluster[counted & (losses != 0)], sign)

    def seed_weights(self, floor: float) -> np.ndarray:
        """`cluster_seed_weights` of the losses these totals hold."""
        num_clusters = len(self.sums)
        has = self.counts > 0
        if not has.any():
            return np.full(num_clusters, 1.0 / num_clusters)
        cluster_loss = np.zeros(num_clusters)
        sums = np.where(self.nonzero > 0, self.sums, 0.0)
        cluster_loss[has] = sums[has] / self.counts[has]
        mean_loss = cluster_loss[has].mean()
        if not mean_loss > 0:
            return np.full(num_clusters, 1.0 / num_clusters)
        cluster_loss[~has] = mean_loss
        weights = np.maximum(cluster_loss, floor * mean_loss)
        return weights / weights.sum()
