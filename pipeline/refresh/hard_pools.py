"""PDDM's hard-negative pools over the full training set (methods.md §2, "Hard-sample pools").

For every class c, its pool is the `pool_size` examples of *other* classes nearest to c: ranked
by their distance to c's nearest member (squared Euclidean, ties by id). Built from one exact
faiss kNN search of every example among all examples.

Why one kNN search is exact: let x (another class) be in c's true pool, q* the member of c
nearest to x. Every y closer to q* than x is either a member of c or another-class example
with d(y, c) <= d(y, q*) < d(x, q*) = d(x, c), i.e. one ranked before x in c's pool. So x is
among the (pool_size + |c|) nearest neighbours of q*, and searching k = pool_size + (largest
class) neighbours of every example finds every pool member with its true distance.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.refresh.cluster_index import faiss_gpu_count

# Queries per faiss search call: bounds the [rows, k] result arrays.
QUERY_ROWS = 16384


@dataclass
class HardPoolIndex:
    """Each training class's hard-negative pool, from the model of step `model_step`.

    `members[offsets[p]:offsets[p + 1]]` are the pool of class `classes[p]`, nearest first, and
    `distances` their squared distances to that class's nearest member.
    """

    version: int
    model_step: int
    classes: np.ndarray
    members: np.ndarray
    offsets: np.ndarray
    distances: np.ndarray
    tag: int = field(default_factory=lambda: int.from_bytes(os.urandom(4), "little") >> 1)
    built_at: float = field(default_factory=time.time)

    def pool(self, class_position: int) -> np.ndarray:
        """The pool of `classes[class_position]`."""
        return self.members[self.offsets[class_position] : self.offsets[class_position + 1]]


def hard_negative_pools(
    embeddings: np.ndarray, labels: np.ndarray, pool_size: int, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, members, offsets, distances): the hard-negative pool of every class.

    embeddings [N, D]; labels [N], -1 for ids that take no part (held out): they are neither
    pooled nor searched from. A class gets min(pool_size, examples of other classes) members.
    """
    import faiss

    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    labels = np.asarray(labels)
    kept = np.flatnonzero(labels >= 0)
    order = kept[np.argsort(labels[kept], kind="stable")]  # queries grouped by class
    classes, class_sizes = np.unique(labels[order], return_counts=True)
    if len(classes) < 2:
        raise ValueError("hard-negative pools need at least two classes")
    vectors = np.ascontiguousarray(embeddings[order], dtype=np.float32)
    index = faiss.IndexFlatL2(vectors.shape[1])
    if use_gpu and faiss_gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    k = int(min(len(order), pool_size + class_sizes.max()))
    # faiss on GPU returns at most 2048 neighbours per query.
    if use_gpu and faiss_gpu_count() > 0 and k > 2048:
        raise ValueError(f"pool_size + largest class = {k} exceeds GPU faiss's 2048 neighbours")

    class_starts = np.concatenate([[0], np.cumsum(class_sizes)])
    pools: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    first = 0
    while first < len(classes):
        # Whole classes per search call, so each class's pool is complete within one chunk.
        last = int(np.searchsorted(class_starts, class_starts[first] + QUERY_ROWS, side="right")) - 1
        last = max(last, first + 1)
        rows = slice(class_starts[first], class_starts[last])
        distances, neighbours = index.search(vectors[rows], k)
        pools.append(_rank_candidates(labels[order[rows]], neighbours, distances, order, labels, pool_size))
        first = last
    pool_class = np.concatenate([p[0] for p in pools])
    members = np.concatenate([p[1] for p in pools]).astype(np.int64)
    pool_distances = np.concatenate([p[2] for p in pools]).astype(np.float32)
    counts = np.bincount(np.searchsorted(classes, pool_class), minlength=len(classes))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return classes, members, offsets, pool_distances


def _rank_candidates(query_class, neighbours, distances, order, labels, pool_size):
    """(class, id, distance) of the first `pool_size` other-class candidates of each class,
    in class order, each ranked by its smallest distance to the class (ties by id)."""
    k = neighbours.shape[1]
    cls = np.repeat(query_class, k)
    found = neighbours.ravel()
    valid = found >= 0
    ids = np.where(valid, order[np.where(valid, found, 0)], -1)
    dist = distances.ravel()
    other = valid & (labels[ids] != cls)
    cls, ids, dist = cls[other], ids[other], dist[other]
    # The smallest distance of each (class, candidate) pair...
    by_pair = np.lexsort((dist, ids, cls))
    cls, ids, dist = cls[by_pair], ids[by_pair], dist[by_pair]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (cls[1:] != cls[:-1]) | (ids[1:] != ids[:-1])
    cls, ids, dist = cls[first], ids[first], dist[first]
    # ...then each class's candidates nearest first, the first pool_size kept.
    ranked = np.lexsort((ids, dist, cls))
    cls, ids, dist = cls[ranked], ids[ranked], dist[ranked]
    starts = np.flatnonzero(np.concatenate([[True], cls[1:] != cls[:-1]]))
    rank = np.arange(len(cls)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(cls)]])))
    keep = rank < pool_size
    return cls[keep], ids[keep], dist[keep]


def build_hard_pools(
    embeddings: np.ndarray, labels: np.ndarray, pool_size: int, version: int, model_step: int, use_gpu: bool = False
) -> tuple[HardPoolIndex, float]:
    """The pools of one refresh, and the seconds the kNN search and ranking took."""
    start = time.perf_counter()
    classes, members, offsets, distances = hard_negative_pools(embeddings, labels, pool_size, use_gpu)
    seconds = time.perf_counter() - start
    index = HardPoolIndex(
        version=version, model_step=model_step, classes=classes, members=members, offsets=offsets,
        distances=distances,
    )
    return index, seconds
