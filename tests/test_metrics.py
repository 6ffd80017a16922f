"""Retrieval metrics against a plain float64 reference, hand-computed cases and bad inputs."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from pipeline.evaluation import DEFAULT_KS, SOP_KS, kmeans_nmi, retrieval_metrics
from pipeline.evaluation.metrics import _flat_index, _search


def reference_metrics(queries, q_labels, gallery=None, g_labels=None, ks=DEFAULT_KS):
    """Brute force: full float64 distance matrix, argsort per query, loops for the formulas."""
    exclude_self = gallery is None
    if exclude_self:
        gallery, g_labels = queries, q_labels
    q = queries.astype(np.float64)
    g = gallery.astype(np.float64)
    distances = ((q[:, None, :] - g[None, :, :]) ** 2).sum(axis=2)
    hits = dict.fromkeys(ks, 0)
    average_precisions, r_precisions = [], []
    for i in range(len(q)):
        order = np.argsort(distances[i], kind="stable")
        if exclude_self:
            order = order[order != i]
        relevant = g_labels[order] == q_labels[i]
        for k in ks:
            hits[k] += bool(relevant[:k].any())
        r = int(relevant.sum())
        if r == 0:
            continue
        found, precision_sum = 0, 0.0
        for rank in range(1, r + 1):
            if relevant[rank - 1]:
                found += 1
                precision_sum += found / rank
        average_precisions.append(precision_sum / r)
        r_precisions.append(found / r)
    expected = {f"recall@{k}": hits[k] / len(q) for k in ks}
    expected["map@r"] = float(np.mean(average_precisions)) if average_precisions else math.nan
    expected["r_precision"] = float(np.mean(r_precisions)) if r_precisions else math.nan
    expected["num_queries"] = len(q)
    expected["num_queries_without_positives"] = len(q) - len(average_precisions)
    return expected


def uneven_labels(rng, n, num_classes):
    """Labels with skewed class sizes and one class of a single item (so R = 0 there)."""
    weights = rng.dirichlet(np.full(num_classes, 0.5))
    labels = rng.choice(num_classes, size=n, p=weights)
    labels[0] = num_classes  # the singleton class
    return rng.permutation(labels)


def assert_same_metrics(actual, expected):
    assert set(actual) - {"nmi"} == set(expected)
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize(
    ("n", "dim", "num_classes", "chunk", "ks"),
    [
        (40, 4, 5, 7, DEFAULT_KS),
        (300, 8, 30, 64, DEFAULT_KS),
        (513, 16, 12, 100, (1, 3, 5, 50)),
        (60, 3, 4, 1000, SOP_KS),  # ks beyond the set size are capped
    ],
)
def test_matches_reference_without_gallery(n, dim, num_classes, chunk, ks):
    rng = np.random.default_rng(n)
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    labels = uneven_labels(rng, n, num_classes)
    actual = retrieval_metrics(embeddings, labels, ks=ks, query_chunk_size=chunk, compute_nmi=False)
    expected = reference_metrics(embeddings, labels, ks=ks)
    assert expected["num_queries_without_positives"] >= 1
    assert_same_metrics(actual, expected)


@pytest.mark.parametrize(("num_queries", "num_gallery", "chunk"), [(37, 80, 5), (200, 150, 64)])
def test_matches_reference_with_gallery(num_queries, num_gallery, chunk):
    rng = np.random.default_rng(num_queries)
    queries = rng.normal(size=(num_queries, 6)).astype(np.float32)
    gallery = rng.normal(size=(num_gallery, 6)).astype(np.float32)
    # Query labels 0..11, gallery labels 0..9: queries of classes 10, 11 have R = 0.
    q_labels = rng.integers(0, 12, size=num_queries)
    g_labels = uneven_labels(rng, num_gallery, 9)
    actual = retrieval_metrics(
        queries, q_labels, gallery, g_labels, query_chunk_size=chunk, compute_nmi=False
    )
    expected = reference_metrics(queries, q_labels, gallery, g_labels)
    assert expected["num_queries_without_positives"] >= 1
    assert_same_metrics(actual, expected)


def test_chunk_size_does_not_change_results():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(97, 5)).astype(np.float32)
    labels = uneven_labels(rng, 97, 8)
    results = [
        retrieval_metrics(embeddings, labels, query_chunk_size=chunk, compute_nmi=False)
        for chunk in (1, 13, 97, 5000)
    ]
    for other in results[1:]:
        assert other == pytest.approx(results[0], abs=1e-12)


def test_points_on_a_line_by_hand():
    # Squared distances make every ranking strict; worked out by hand:
    #   0.0 (A): B, A, A, B   R=2 -> AP = (1/2)(1/2) = 1/4, RP = 1/2
    #   1.0 (B): A, A, A, B   R=1 -> AP = 0, RP = 0 (same-label item only at rank 4)
    #   2.4 (A): B, A, A, B   R=2 -> AP = 1/4, RP = 1/2
    #   4.0 (A): A, B, A, B   R=2 -> AP = (1/2)(1) = 1/2, RP = 1/2
    #  10.0 (B): A, A, B, A   R=1 -> AP = 0, RP = 0
    embeddings = np.array([[0.0], [1.0], [2.4], [4.0], [10.0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    results = retrieval_metrics(embeddings, labels, ks=(1, 2, 4), compute_nmi=False)
    assert results["recall@1"] == pytest.approx(1 / 5)
    assert results["recall@2"] == pytest.approx(3 / 5)
    assert results["recall@4"] == pytest.approx(1.0)
    assert results["map@r"] == pytest.approx((1 / 4 + 0 + 1 / 4 + 1 / 2 + 0) / 5)
    assert results["r_precision"] == pytest.approx((1 / 2 + 0 + 1 / 2 + 1 / 2 + 0) / 5)
    assert results["num_queries_without_positives"] == 0


def test_gallery_by_hand():
    # Query at 0 (label 1) sees gallery 1 (1), 2 (0), 3 (1), 4 (1): R = 3, relevance 1, 0, 1
    # -> AP = (1/3)(1/1 + 2/3) = 5/9, RP = 2/3. A query whose label is absent has R = 0:
    # it misses Recall@1 and is left out of MAP@R and R-Precision.
    queries = np.array([[0.0], [0.1]], dtype=np.float32)
    q_labels = np.array([1, 7])
    gallery = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    g_labels = np.array([1, 0, 1, 1])
    results = retrieval_metrics(queries, q_labels, gallery, g_labels, ks=(1,), compute_nmi=False)
    assert results["recall@1"] == pytest.approx(1 / 2)
    assert results["map@r"] == pytest.approx(5 / 9)
    assert results["r_precision"] == pytest.approx(2 / 3)
    assert results["num_queries"] == 2
    assert results["num_queries_without_positives"] == 1


def test_duplicates_exclude_self_by_index():
    # Each class is 3 copies of one point: excluding "distance 0" instead of the query's own
    # index would throw away the copies and give 0 everywhere.
    embeddings = np.repeat(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32), 3, 0)
    labels = np.repeat(np.arange(3), 3)
    results = retrieval_metrics(embeddings, labels, ks=(1, 2), compute_nmi=False)
    for key in ("recall@1", "recall@2", "map@r", "r_precision"):
        assert results[key] == pytest.approx(1.0), key


def test_search_drops_self_even_when_ranked_past_depth():
    # 50 identical points: faiss may rank the query itself anywhere among the ties.
    embeddings = np.zeros((50, 4), dtype=np.float32)
    index = _flat_index(embeddings, use_gpu=False, k=6)
    neighbours = _search(index, embeddings[10:30], depth=5, self_offset=10)
    assert neighbours.shape == (20, 5)
    for row, query in zip(neighbours, range(10, 30), strict=True):
        assert query not in row
        assert len(set(row.tolist())) == 5


def test_all_singletons_give_nan_ranking_metrics():
    embeddings = np.arange(8, dtype=np.float32).reshape(4, 2)
    results = retrieval_metrics(embeddings, np.arange(4), compute_nmi=False)
    assert results["recall@1"] == 0.0
    assert math.isnan(results["map@r"]) and math.isnan(results["r_precision"])
    assert results["num_queries_without_positives"] == 4


def blobs(rng, num_classes, per_class, dim=8, spread=100.0):
    centres = rng.normal(size=(num_classes, dim)) * spread
    labels = np.repeat(np.arange(num_classes), per_class)
    embeddings = centres[labels] + rng.normal(size=(len(labels), dim))
    return embeddings.astype(np.float32), labels


@pytest.mark.parametrize("seed", range(4))
def test_nmi_of_separated_blobs_is_one(seed):
    # Two blobs: faiss k-means starts from random points (no k-means++), so with many blobs a
    # seed can land in a local minimum; with two, Lloyd's iterations always separate them.
    embeddings, labels = blobs(np.random.default_rng(seed), 2, 40)
    assert kmeans_nmi(embeddings, labels, seed=seed) == pytest.approx(1.0)
    results = retrieval_metrics(embeddings, labels, nmi_seed=seed)
    assert results["nmi"] == pytest.approx(1.0)
    assert results["recall@1"] == 1.0


def test_nmi_equals_sklearn_on_the_same_assignment():
    rng = np.random.default_rng(3)
    embeddings, labels = blobs(rng, 6, 25, spread=1.0)
    kmeans = faiss.Kmeans(
        8, 6, niter=20, seed=5, min_points_per_centroid=1, max_points_per_centroid=25
    )
    kmeans.train(embeddings)
    _, assignment = kmeans.index.search(embeddings, 1)
    expected = normalized_mutual_info_score(labels, assignment[:, 0])
    assert 0.0 < expected < 1.0
    assert kmeans_nmi(embeddings, labels, seed=5) == pytest.approx(expected, abs=1e-12)


def test_nmi_with_gallery_clusters_queries_and_gallery_together():
    embeddings, labels = blobs(np.random.default_rng(4), 5, 20, spread=1.0)
    split = retrieval_metrics(embeddings[:30], labels[:30], embeddings[30:], labels[30:])
    assert split["nmi"] == pytest.approx(kmeans_nmi(embeddings, labels), abs=1e-12)


def test_use_gpu_falls_back_to_cpu_with_a_warning():
    if faiss.get_num_gpus() > 0 or torch.cuda.is_available():
        pytest.skip("a GPU is visible; the fallback only runs without one")
    embeddings, labels = blobs(np.random.default_rng(5), 3, 10)
    with pytest.warns(UserWarning, match="no GPU"):
        on_cpu = retrieval_metrics(embeddings, labels, use_gpu=True)
    assert on_cpu == retrieval_metrics(embeddings, labels)


@pytest.mark.gpu
def test_gpu_matches_cpu():
    from pipeline.exact_search import gpu_backend

    if gpu_backend(1) is None:
        pytest.skip("no GPU visible to faiss or torch")
    rng = np.random.default_rng(6)
    embeddings = rng.normal(size=(2000, 32)).astype(np.float32)
    labels = uneven_labels(rng, 2000, 50)
    on_gpu = retrieval_metrics(embeddings, labels, query_chunk_size=300, use_gpu=True)
    on_cpu = retrieval_metrics(embeddings, labels, query_chunk_size=300)
    for key in on_cpu:
        if key != "nmi":  # GPU k-means is a different float path; NMI may differ slightly
            assert on_gpu[key] == pytest.approx(on_cpu[key], abs=1e-3), key


def test_accepts_other_dtypes_and_layouts():
    rng = np.random.default_rng(7)
    embeddings = rng.normal(size=(6, 30))  # float64, and a strided view below
    labels = np.array([0, 0, 1, 1, 2, 2], dtype=np.int32)
    view = embeddings[:, ::3]
    results = retrieval_metrics(view, labels, compute_nmi=False)
    assert results == retrieval_metrics(
        np.ascontiguousarray(view, dtype=np.float32), labels.astype(np.int64), compute_nmi=False
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((np.zeros((1, 3), np.float32), np.array([0])), {}, ValueError, "at least 2 items"),
        ((np.zeros((4, 3), np.float32), np.array([0, 1, 2])), {}, ValueError, "labels must be"),
        ((np.zeros(4, np.float32), np.arange(4)), {}, ValueError, r"\[N, D\]"),
        ((np.zeros((0, 3), np.float32), np.arange(0)), {}, ValueError, "empty"),
        ((np.zeros((4, 3), np.float32), np.zeros(4)), {}, TypeError, "integers"),
        (
            (np.array([[0.0], [np.nan], [1.0]], np.float32), np.arange(3)),
            {},
            ValueError,
            "NaN",
        ),
        (
            (np.array([[0.0], [np.inf]], np.float32), np.arange(2)),
            {},
            ValueError,
            "NaN or inf",
        ),
        (
            (
                np.zeros((4, 3), np.float32),
                np.arange(4),
                np.zeros((4, 2), np.float32),
                np.arange(4),
            ),
            {},
            ValueError,
            "dimensions differ",
        ),
        (
            (np.zeros((4, 3), np.float32), np.arange(4), np.zeros((4, 3), np.float32)),
            {},
            ValueError,
            "together",
        ),
        ((np.zeros((4, 3), np.float32), np.arange(4)), {"ks": ()}, ValueError, "ks"),
        ((np.zeros((4, 3), np.float32), np.arange(4)), {"ks": (0, 1)}, ValueError, "ks"),
        (
            (np.zeros((4, 3), np.float32), np.arange(4)),
            {"query_chunk_size": 0},
            ValueError,
            "query_chunk_size",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        retrieval_metrics(*args, **kwargs)
