"""Retrieval metrics of the deep-metric-learning literature: Recall@K, MAP@R, R-Precision, NMI.

Distances are squared Euclidean, searched exactly (faiss; with `use_gpu`, faiss-gpu or torch's
CUDA device, see pipeline.exact_search). Queries are searched in chunks against an index holding
the gallery, and each chunk is reduced to per-query numbers straight away, so memory stays at
O(chunk x search depth) and never reaches N x N (or N x k for all N at once).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from pipeline.exact_search import faiss_kmeans, flat_l2_index, gpu_backend, torch_kmeans

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)
"""Recall@K cut-offs used for CUB-200-2011, Cars196 and In-Shop."""

SOP_KS: tuple[int, ...] = (1, 10, 100, 1000)
"""Recall@K cut-offs used for Stanford Online Products."""


def retrieval_metrics(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_embeddings: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    query_chunk_size: int = 4096,
    compute_nmi: bool = True,
    nmi_seed: int = 0,
    use_gpu: bool = False,
) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision and (optionally) NMI of embeddings [N, D] with labels [N].

    Without a gallery every query is ranked against all *other* items of the same set (itself
    excluded by index, so duplicate embeddings are handled); with a gallery (In-Shop) queries are
    ranked against the whole gallery. For a query, R is the number of same-label gallery items
    other than itself. Recall@K counts every query (one with R = 0 is a miss); MAP@R and
    R-Precision average only over queries with R > 0 (NaN when there are none). A K larger than
    the number of candidates is capped at that number. NMI clusters queries and gallery together
    (see `kmeans_nmi`). Returns `recall@{k}`, `map@r`, `r_precision`, `nmi` (when asked),
    `num_queries` and `num_queries_without_positives`.
    """
    queries, q_labels, gallery, g_labels = _validated(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels
    )
    ks = _validated_ks(ks)
    if query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be >= 1, got {query_chunk_size}")
    exclude_self = gallery is None

    results = _ranking_metrics(
        queries,
        q_labels,
        queries if exclude_self else gallery,
        q_labels if exclude_self else g_labels,
        exclude_self=exclude_self,
        ks=ks,
        query_chunk_size=query_chunk_size,
        use_gpu=use_gpu,
    )
    if compute_nmi:
        if exclude_self:
            results["nmi"] = kmeans_nmi(queries, q_labels, seed=nmi_seed, use_gpu=use_gpu)
        else:
            results["nmi"] = kmeans_nmi(
                np.concatenate([queries, gallery]),
                np.concatenate([q_labels, g_labels]),
                seed=nmi_seed,
                use_gpu=use_gpu,
            )
    return results


def knn_accuracy(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    k: int = 1,
    query_chunk_size: int = 4096,
    use_gpu: bool = False,
) -> float:
    """Classification accuracy of a k-nearest-neighbour vote: each query takes the most common
    label among its `k` nearest gallery items (squared Euclidean, exact search).

    A tie goes to the tied label whose nearest member ranks first, so k=1 is the nearest
    neighbour's label. This is the seen-class error of the Magnet paper's baselines: queries
    are held-out images of the training classes, the gallery the images trained on.
    """
    queries, q_labels, gallery, g_labels = _validated(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels
    )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be >= 1, got {query_chunk_size}")
    depth = min(k, len(gallery))
    index = _flat_index(gallery, use_gpu=use_gpu, k=depth)
    correct = 0
    for start in range(0, len(queries), query_chunk_size):
        chunk = queries[start : start + query_chunk_size]
        votes = g_labels[_search(index, chunk, depth, None)]  # [chunk, depth], nearest first
        # For each (query, rank): how many of the query's neighbours share that rank's label.
        # The winner is the first rank with the highest count (ties go to the nearest label).
        counts = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)
        predicted = votes[np.arange(len(votes)), counts.argmax(axis=1)]
        correct += int((predicted == q_labels[start : start + query_chunk_size]).sum())
    return correct / len(queries)


def kmeans_nmi(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    niter: int = 20,
    use_gpu: bool = False,
) -> float:
    """NMI between labels and a k-means clustering with as many clusters as distinct labels.

    Uses faiss k-means on all points (no subsampling) with a fixed seed, then sklearn's
    `normalized_mutual_info_score` (arithmetic normalisation). With `use_gpu` it runs on faiss-gpu,
    or where only torch sees the GPU, faiss's k-means loop with torch's search
    (`pipeline.exact_search.torch_kmeans`: the same algorithm, another initial draw).
    """
    embeddings, labels, _, _ = _validated(embeddings, labels, None, None)
    num_clusters = int(np.unique(labels).size)
    backend = _gpu_backend(use_gpu, 1)
    if backend == "torch":
        assignment = torch_kmeans(embeddings, num_clusters, seed=seed, niter=niter)
        return _nmi(labels, assignment)
    kmeans = faiss_kmeans(
        embeddings.shape[1],
        num_clusters,
        niter=niter,
        seed=seed,
        verbose=False,
        on_gpu=backend == "faiss",
        # Test sets such as SOP have ~5 items per class: the defaults would print a warning
        # (too few points per centroid) or subsample large sets; we want plain k-means on all.
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-len(embeddings) // num_clusters)),
    )
    kmeans.train(embeddings)
    _, assignment = kmeans.index.search(embeddings, 1)
    return _nmi(labels, assignment[:, 0])


def _nmi(labels: np.ndarray, assignment: np.ndarray) -> float:
    # sklearn is imported here, not with this module: every Train worker (and the Train
    # controller, which unpickles the worker function) imports this module, and sklearn took
    # about 1 s of each process's start on a 2-core VM.
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels, assignment))


def _ranking_metrics(
    queries: np.ndarray,
    q_labels: np.ndarray,
    gallery: np.ndarray,
    g_labels: np.ndarray,
    *,
    exclude_self: bool,
    ks: tuple[int, ...],
    query_chunk_size: int,
    use_gpu: bool,
) -> dict[str, float]:
    """Chunked kNN search and per-query reduction; `exclude_self` means queries is gallery."""
    num_candidates = len(gallery) - 1 if exclude_self else len(gallery)
    num_relevant = _num_relevant(q_labels, g_labels, exclude_self)
    max_ks = min(max(ks), num_candidates)
    deepest = min(max(max_ks, int(num_relevant.max())), num_candidates)
    index = _flat_index(gallery, use_gpu=use_gpu, k=deepest + exclude_self)

    recall_hits = np.zeros(len(ks), dtype=np.int64)
    map_sum = r_precision_sum = 0.0
    for start in range(0, len(queries), query_chunk_size):
        stop = min(start + query_chunk_size, len(queries))
        r = num_relevant[start:stop]
        # Search each chunk only as deep as it needs: max R varies a lot between chunks.
        depth = min(max(max_ks, int(r.max())), num_candidates)
        neighbours = _search(index, queries[start:stop], depth, start if exclude_self else None)
        relevant = g_labels[neighbours] == q_labels[start:stop, None]

        for i, k in enumerate(ks):
            recall_hits[i] += int(relevant[:, : min(k, depth)].any(axis=1).sum())

        ranks = np.arange(1, depth + 1)
        in_top_r = relevant & (ranks[None, :] <= r[:, None])
        has_positives = r > 0
        hits_at = np.cumsum(in_top_r, axis=1)
        # P(i) * rel(i), summed over i <= R; rel(i) = 0 beyond R by construction of in_top_r.
        ap_numerator = (hits_at / ranks[None, :] * in_top_r).sum(axis=1)
        map_sum += float((ap_numerator[has_positives] / r[has_positives]).sum())
        r_precision_sum += float((hits_at[has_positives, -1] / r[has_positives]).sum())

    num_queries = len(queries)
    num_with_positives = int((num_relevant > 0).sum())
    results: dict[str, float] = {
        f"recall@{k}": float(hits / num_queries) for k, hits in zip(ks, recall_hits, strict=True)
    }
    results["map@r"] = map_sum / num_with_positives if num_with_positives else float("nan")
    results["r_precision"] = (
        r_precision_sum / num_with_positives if num_with_positives else float("nan")
    )
    results["num_queries"] = num_queries
    results["num_queries_without_positives"] = num_queries - num_with_positives
    return results


def _search(index, queries: np.ndarray, depth: int, self_offset: int | None) -> np.ndarray:
    """Indices of the `depth` nearest gallery items per query, the query itself removed.

    `self_offset` is the gallery index of the chunk's first query when queries are the gallery.
    """
    if self_offset is None:
        _, neighbours = index.search(queries, depth)
        return neighbours
    _, neighbours = index.search(queries, depth + 1)
    is_self = neighbours == np.arange(self_offset, self_offset + len(queries))[:, None]
    # With duplicates (all at distance 0) the query may be ranked past depth + 1; the last
    # column is then an extra neighbour, and dropping it keeps exactly one removal per row.
    is_self[~is_self.any(axis=1), -1] = True
    return neighbours[~is_self].reshape(len(queries), depth)


def _num_relevant(q_labels: np.ndarray, g_labels: np.ndarray, exclude_self: bool) -> np.ndarray:
    """R per query: same-label gallery items, not counting the query itself."""
    classes, counts = np.unique(g_labels, return_counts=True)
    position = np.clip(np.searchsorted(classes, q_labels), 0, len(classes) - 1)
    found = classes[position] == q_labels
    return np.where(found, counts[position], 0) - int(exclude_self)


def _flat_index(gallery: np.ndarray, *, use_gpu: bool, k: int):
    """Exact squared-L2 index over the gallery for k-NN searches, on a GPU when asked and
    one is visible."""
    return flat_l2_index(gallery, use_gpu=_gpu_backend(use_gpu, k) is not None, k=k)


def _gpu_backend(use_gpu: bool, k: int) -> str | None:
    """The GPU search to use (pipeline.exact_search.gpu_backend), or None: not asked, or asked
    where no GPU is visible, which it warns about."""
    if not use_gpu:
        return None
    backend = gpu_backend(k)
    if backend is None:
        warnings.warn("use_gpu=True but no GPU is visible to faiss or torch; using the CPU", stacklevel=3)
    return backend


def _validated(
    q_emb, q_labels, g_emb, g_labels
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Checks shapes and values; returns C-contiguous float32 embeddings and integer labels."""
    if (g_emb is None) != (g_labels is None):
        raise ValueError("gallery_embeddings and gallery_labels must be given together")
    queries, q_labels = _checked_set(q_emb, q_labels, "query")
    if g_emb is None:
        if len(queries) < 2:
            raise ValueError(f"need at least 2 items to compare, got {len(queries)}")
        return queries, q_labels, None, None
    gallery, g_labels = _checked_set(g_emb, g_labels, "gallery")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(
            f"query and gallery dimensions differ: {queries.shape[1]} vs {gallery.shape[1]}"
        )
    return queries, q_labels, gallery, g_labels


def _checked_set(embeddings, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One embeddings/labels pair: [N, D] finite floats, [N] integers, N >= 1."""
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"{name} embeddings must be [N, D], got shape {embeddings.shape}")
    if labels.ndim != 1 or len(labels) != len(embeddings):
        raise ValueError(
            f"{name} labels must be [N] with N = {len(embeddings)}, got shape {labels.shape}"
        )
    if len(embeddings) == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"{name} embeddings are empty: shape {embeddings.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} labels must be integers, got dtype {labels.dtype}")
    # Convert once: faiss needs C-contiguous float32 (no copy when it already is).
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{name} embeddings contain NaN or inf")
    return embeddings, labels


def _validated_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Recall cut-offs as a tuple of positive ints."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    return ks
