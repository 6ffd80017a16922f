"""The numbers the run plots show, computed from a split's embeddings (no plotting here)."""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.metrics import retrieval_metrics


def recall_curve(
    embeddings: np.ndarray, labels: np.ndarray, max_k: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(K, Recall@K) for K = 1, 2, 4, ... up to `max_k` or the number of other items, every
    query against all other items (as the evaluation does)."""
    candidates = len(labels) - 1
    top = max(1, min(max_k, candidates))
    ks = sorted({2**i for i in range(int(np.log2(top)) + 1)} | {top})
    metrics = retrieval_metrics(embeddings, labels, ks=ks, compute_nmi=False)
    return np.asarray(ks), np.asarray([metrics[f"recall@{k}"] for k in ks])


def projection_sample(
    labels: np.ndarray, max_points: int = 2000, max_classes: int = 20, seed: int = 0
) -> np.ndarray:
    """Sorted indices of at most `max_points` items from at most `max_classes` classes drawn at
    random (seeded), so that a 2-D projection stays readable and fast."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if len(classes) > max_classes:
        classes = rng.choice(classes, max_classes, replace=False)
    candidates = np.flatnonzero(np.isin(labels, classes))
    if len(candidates) > max_points:
        candidates = rng.choice(candidates, max_points, replace=False)
    return np.sort(candidates)


def project_2d(embeddings: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """Points [N, 2]: t-SNE (PCA-initialised) or PCA of the embeddings."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(embeddings) < 3:
        raise ValueError(f"need at least 3 points to project, got {len(embeddings)}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    if method == "tsne":
        from threadpoolctl import threadpool_limits

        perplexity = min(30.0, (len(embeddings) - 1) / 3)
        tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
        # One thread: the driver shares its machine with Ray, and OpenMP threads contending
        # for busy cores made even a 40-point t-SNE take 20 s instead of 1.5 s here.
        with threadpool_limits(limits=1):
            return tsne.fit_transform(embeddings)
    raise ValueError(f"projection method must be 'tsne' or 'pca', got {method!r}")


def pick_queries(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices of `count` queries (seeded), from distinct classes while there are enough, each
    with at least one other item of its class (so a correct neighbour exists)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    usable = classes[counts > 1]
    if len(usable) == 0:
        raise ValueError("no class has two items: no query can have a correct neighbour")
    chosen = rng.choice(usable, count, replace=len(usable) < count)
    picked: list[int] = []
    for label in chosen:
        members = np.setdiff1d(np.flatnonzero(labels == label), picked)
        if len(members):  # a tiny split may run out of items of a class drawn twice
            picked.append(int(rng.choice(members)))
    return np.asarray(picked)


def nearest_neighbours(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of each query item's k nearest other items (squared L2, exact)."""
    import faiss

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    k = min(k, len(embeddings) - 1)
    index = faiss.IndexFlatL2(embeddings.shape[1])
    index.add(embeddings)
    _, found = index.search(embeddings[queries], k + 1)
    # Drop the query itself (with duplicates it need not come first); keep k of the rest.
    return np.stack([row[row != q][:k] for row, q in zip(found, queries, strict=True)])
