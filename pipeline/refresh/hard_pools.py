"""PDDM's hard-negative pools over the full training set (methods.md §2, "Hard-sample pools").

For every class c, its pool is the `pool_size` examples of *other* classes nearest to c: ranked
by their distance to c's nearest member (squared Euclidean, ties by id). Built from one exact
faiss kNN search of every example among all examples.

Why one kNN search is exact: let x (another class) be in c's true pool, q* the member of c
nearest to x. Every y closer to q* than x is either a member of c or another-class example
with d(y, c) <= d(y, q*) < d(x, q*) = d(x, c), i.e. one ranked before x in c's pool. So x is
among the (pool_size + |c|) nearest neighbours of q*, and searching that many neighbours of
every member of c finds every pool member with its true distance. The exact search goes through
classes in runs of similar size, each run as deep as its largest class needs.

That search is N^2 D: 18 s for 100k 128-d embeddings on 2 CPU cores, 24 minutes for 1M
(benchmarks/README.md); on a GPU it runs on faiss-gpu, or torch's CUDA device where faiss has
no GPU (pipeline.exact_search). `index_description` swaps the exact `Flat` index for any faiss
`index_factory` one ("IVF4096,Flat", "HNSW32"), with `search_params` for faiss's
`ParameterSpace` ("nprobe=32", "efSearch=128"): the same k neighbours, found approximately, so a
pool may miss some of its true members. A class the approximate search leaves short (fewer
members than it should have) gets its pool from an exact search of its own members, so every
class keeps a full pool whichever index is used. An approximate pool's distances are to the
nearest member whose search found it: never below the true distance to the class.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.exact_search import FAISS_GPU_MAX_K, faiss_gpu_count, faiss_to_gpu, flat_l2_index

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


EXACT_INDEX = "Flat"


def pool_search_index(dim: int, description: str = EXACT_INDEX, search_params: str = ""):
    """The (untrained, empty) faiss index of the pools' kNN search, its search parameters set.

    Raises ValueError naming the description or the parameters faiss refuses."""
    import faiss

    try:
        index = faiss.index_factory(dim, description, faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(f"index description {description!r}: faiss cannot build it ({_faiss_message(err)})") from err
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as err:
            raise ValueError(
                f"search parameters {search_params!r} do not apply to a {description!r} index "
                "(IVF takes nprobe=..., HNSW efSearch=...)"
            ) from err
    return index


def training_points_needed(dim: int, description: str) -> int:
    """The fewest vectors the description's index can be trained on (IVF: one per list)."""
    import faiss

    index = pool_search_index(dim, description)
    if index.is_trained:
        return 0
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:  # not IVF (e.g. PQ alone): faiss says at training time
        return 1


def check_index_trains(dim: int, description: str, available: int, where: str, what: str) -> None:
    """Raise ValueError naming `where` when `available` vectors (`what` they are, for the
    message) are too few to train the index `description` describes; checked before any work
    that would end in faiss refusing to train it."""
    needed = training_points_needed(dim, description)
    if available < needed:
        raise ValueError(f"{where}: {description!r} trains on {what} but needs at least {needed}; "
                         f"use fewer lists or Flat")


def _faiss_message(err: Exception) -> str:
    """The line of a faiss RuntimeError that says what is wrong (its last; the rest is a C++ trace)."""
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__


def hard_negative_pools(
    embeddings: np.ndarray,
    labels: np.ndarray,
    pool_size: int,
    use_gpu: bool = False,
    index_description: str = EXACT_INDEX,
    search_params: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, members, offsets, distances): the hard-negative pool of every class.

    embeddings [N, D]; labels [N], -1 for ids that take no part (held out): they are neither
    pooled nor searched from. A class gets min(pool_size, examples of other classes) members.
    `index_description` and `search_params` choose the kNN index (module docstring).
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    labels = np.asarray(labels)
    kept = np.flatnonzero(labels >= 0)
    order = kept[np.argsort(labels[kept], kind="stable")]  # queries grouped by class
    classes, class_sizes = np.unique(labels[order], return_counts=True)
    if len(classes) < 2:
        raise ValueError("hard-negative pools need at least two classes")
    vectors = np.ascontiguousarray(embeddings[order], dtype=np.float32)
    k = int(min(len(order), pool_size + class_sizes.max()))
    index = _search_index(vectors, index_description, search_params, use_gpu, k)
    class_starts = np.concatenate([[0], np.cumsum(class_sizes)])
    exact = index_description == EXACT_INDEX and not search_params
    pools = _class_pools(index, vectors, class_starts, np.arange(len(classes)), k, order, labels, pool_size, exact)
    if index_description != EXACT_INDEX:
        pools = _fill_short_pools(pools, vectors, class_starts, classes, class_sizes, k, order, labels, pool_size,
                                  use_gpu)
    # Chunks come in class-size order; each class's rows are in one chunk, nearest first, and
    # a stable sort by class keeps them so.
    pool_class = np.concatenate([p[0] for p in pools])
    by_class = np.argsort(pool_class, kind="stable")
    pool_class = pool_class[by_class]
    members = np.concatenate([p[1] for p in pools])[by_class].astype(np.int64)
    pool_distances = np.concatenate([p[2] for p in pools])[by_class].astype(np.float32)
    counts = np.bincount(np.searchsorted(classes, pool_class), minlength=len(classes))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return classes, members, offsets, pool_distances


def _search_index(vectors, description, search_params, use_gpu, k):
    """The kNN index over `vectors`: trained if it needs it, on the GPUs when asked and able
    (the exact search through pipeline.exact_search: faiss-gpu, else torch's CUDA device)."""
    if description == EXACT_INDEX and not search_params:
        return flat_l2_index(vectors, use_gpu=use_gpu, k=k)
    index = pool_search_index(vectors.shape[1], description, search_params)
    # Deeper than GPU faiss's k-selection goes (pool_size + largest class), the approximate
    # index searches on the CPU, as HNSW always does.
    if use_gpu and faiss_gpu_count() > 0 and k <= FAISS_GPU_MAX_K:
        try:
            # Flat and IVF indexes move to the GPU, keeping nprobe; HNSW has no GPU form, so
            # it searches on the CPU rather than failing the refresh.
            index = faiss_to_gpu(index)
        except RuntimeError:
            pass
    if not index.is_trained:
        needed = training_points_needed(vectors.shape[1], description)
        if len(vectors) < needed:
            raise ValueError(
                f"index {description!r} needs at least {needed} training vectors, the pools have {len(vectors)}"
            )
        index.train(vectors)
    index.add(vectors)
    return index


def _class_pools(search, vectors, class_starts, positions, k, order, labels, pool_size, exact):
    """[(class, id, distance) arrays] of the pools of the classes at `positions`, each from a
    kNN search of its members: of depth pool_size + (the largest class searched with it) when
    the search is `exact`, else of depth k.

    The proof above needs depth pool_size + |c| for class c only, so classes are searched
    smallest first in runs of similar size: one class of 1,000 images in a long-tailed set
    would otherwise make every query search (and rank) 1,000 neighbours more than it needs.
    An approximate index keeps depth k: HNSW widens its search to k candidates when k is
    above efSearch, so a shallower search would find other, worse pools.
    """
    sizes = class_starts[positions + 1] - class_starts[positions]
    by_size = np.argsort(sizes, kind="stable")
    pools: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    first = 0
    while first < len(by_size):
        # Whole classes per search call, so each class's pool is complete within one chunk.
        last, rows_in_chunk = first + 1, sizes[by_size[first]]
        while last < len(by_size) and rows_in_chunk + sizes[by_size[last]] <= QUERY_ROWS:
            rows_in_chunk += sizes[by_size[last]]
            last += 1
        chunk = np.sort(positions[by_size[first:last]])
        starts, lengths = class_starts[chunk], class_starts[chunk + 1] - class_starts[chunk]
        rows = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        depth = int(min(k, pool_size + lengths.max())) if exact else k
        distances, neighbours = search.search(vectors[rows], depth)
        pools.append(_rank_candidates(labels[order[rows]], neighbours, distances, order, labels, pool_size))
        first = last
    return pools


def _fill_short_pools(pools, vectors, class_starts, classes, class_sizes, k, order, labels, pool_size, use_gpu):
    """The pools, with those of classes an approximate search left short rebuilt exactly."""
    found = [np.concatenate([p[i] for p in pools]) for i in range(3)]  # class, id, distance
    counts = np.bincount(np.searchsorted(classes, found[0]), minlength=len(classes))
    short = np.flatnonzero(counts < np.minimum(pool_size, len(order) - class_sizes))
    if len(short) == 0:
        return pools
    exact = flat_l2_index(vectors, use_gpu=use_gpu, k=k)
    rebuilt = _class_pools(exact, vectors, class_starts, short, k, order, labels, pool_size, exact=True)
    keep = ~np.isin(found[0], classes[short])
    return [tuple(part[keep] for part in found), *rebuilt]


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
    embeddings: np.ndarray,
    labels: np.ndarray,
    pool_size: int,
    version: int,
    model_step: int,
    use_gpu: bool = False,
    index_description: str = EXACT_INDEX,
    search_params: str = "",
) -> tuple[HardPoolIndex, float]:
    """The pools of one refresh, and the seconds the kNN search and ranking took."""
    start = time.perf_counter()
    classes, members, offsets, distances = hard_negative_pools(
        embeddings, labels, pool_size, use_gpu, index_description, search_params
    )
    seconds = time.perf_counter() - start
    index = HardPoolIndex(
        version=version, model_step=model_step, classes=classes, members=members, offsets=offsets,
        distances=distances,
    )
    return index, seconds
