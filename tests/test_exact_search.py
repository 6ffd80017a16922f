"""pipeline.exact_search: torch's exact k-NN search and k-means against float64 brute force,
faiss and sklearn, and the metrics and refresh searches run through it."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from pipeline import exact_search
from pipeline.evaluation import kmeans_nmi, retrieval_metrics
from pipeline.evaluation.metrics import knn_accuracy
from pipeline.exact_search import TorchFlatL2, flat_l2_index, torch_kmeans
from pipeline.refresh.cluster_index import nearest_other_class


def _brute_force(queries, vectors, k):
    """(distances, ids) of each query's k nearest vectors: float64, ties by id."""
    d = ((queries.astype(np.float64)[:, None, :] - vectors.astype(np.float64)[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=1), ids


def test_torch_search_finds_the_exact_neighbours_across_blocks_and_adds():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((700, 24)).astype(np.float32)
    queries = rng.standard_normal((90, 24)).astype(np.float32)
    # 7 query rows per block: 13 blocks, the last one short.
    index = TorchFlatL2(24, "cpu", block_bytes=4 * 700 * 7)
    index.add(vectors[:300])
    index.add(vectors[300:])
    assert index.ntotal == 700
    distances, ids = index.search(queries, 25)
    expected_d, expected_ids = _brute_force(queries, vectors, 25)
    assert distances.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-5, atol=1e-4)


def test_torch_search_pads_like_faiss_when_k_exceeds_the_vectors():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((5, 8)).astype(np.float32)
    index = TorchFlatL2(8, "cpu")
    index.add(vectors)
    reference = faiss.IndexFlatL2(8)
    reference.add(vectors)
    distances, ids = index.search(vectors[:3], 8)
    faiss_d, faiss_ids = reference.search(vectors[:3], 8)
    np.testing.assert_array_equal(ids, faiss_ids)  # 5 real neighbours (self first), then -1
    assert (ids[:, 5:] == -1).all() and np.isinf(distances[:, 5:]).all()
    np.testing.assert_allclose(distances[:, :5], faiss_d[:, :5], atol=1e-5)
    empty = TorchFlatL2(8, "cpu").search(vectors[:2], 3)
    assert (empty[1] == -1).all() and np.isinf(empty[0]).all()


def test_torch_search_names_bad_input():
    index = TorchFlatL2(4, "cpu")
    with pytest.raises(ValueError, match=r"shape \[n, 4\], got \(3, 5\)"):
        index.add(np.zeros((3, 5), np.float32))
    index.add(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        index.search(np.zeros((1, 4), np.float32), 0)


def test_without_a_gpu_the_index_is_faiss_on_the_cpu():
    if torch.cuda.is_available() or exact_search.faiss_gpu_count() > 0:
        pytest.skip("a GPU is visible here")
    assert exact_search.gpu_backend(10) is None
    assert isinstance(flat_l2_index(np.zeros((4, 3), np.float32), use_gpu=True, k=2), faiss.IndexFlatL2)


def test_torch_kmeans_is_lloyds_algorithm_from_faiss_initial_draw():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((6, 10)) * 4
    labels = rng.integers(0, 6, 1200)
    points = (centers[labels] + rng.standard_normal((1200, 10))).astype(np.float32)
    assignment = torch_kmeans(points, 6, seed=7, niter=30, device="cpu")
    # faiss.contrib's loop starts from k points drawn by RandomState(seed); sklearn's Lloyd
    # from the same points must end at the same partition.
    start = points[np.random.RandomState(7).choice(1200, size=6, replace=False)]
    reference = KMeans(6, init=start, n_init=1, algorithm="lloyd", max_iter=30, tol=0).fit(points)
    assert normalized_mutual_info_score(reference.labels_, assignment) == pytest.approx(1.0)
    assert assignment.shape == (1200,) and assignment.dtype == np.int64


def test_metrics_through_the_torch_search_equal_faiss(torch_search_on_cpu):
    rng = np.random.default_rng(3)
    embeddings = rng.standard_normal((600, 16)).astype(np.float32)
    labels = rng.integers(0, 30, 600)
    on_torch = retrieval_metrics(embeddings, labels, query_chunk_size=128, compute_nmi=False, use_gpu=True)
    on_faiss = retrieval_metrics(embeddings, labels, query_chunk_size=128, compute_nmi=False)
    assert on_torch == pytest.approx(on_faiss, abs=1e-12)
    gallery, g_labels = embeddings[:400], labels[:400]
    assert knn_accuracy(embeddings[400:], labels[400:], gallery, g_labels, k=5, use_gpu=True) == \
        knn_accuracy(embeddings[400:], labels[400:], gallery, g_labels, k=5)
    # NMI clusters with torch_kmeans there (another initial draw than faiss's C++ k-means).
    expected = normalized_mutual_info_score(labels, torch_kmeans(embeddings, 30, seed=4, device="cpu"))
    assert kmeans_nmi(embeddings, labels, seed=4, use_gpu=True) == pytest.approx(expected)


def test_impostor_search_through_the_torch_search_equals_faiss(torch_search_on_cpu):
    rng = np.random.default_rng(5)
    centroids = rng.standard_normal((80, 12)).astype(np.float32)
    cluster_class = np.repeat(np.arange(20), 4)
    np.testing.assert_array_equal(
        nearest_other_class(centroids, cluster_class, 6, use_gpu=True),
        nearest_other_class(centroids, cluster_class, 6),
    )


@pytest.mark.gpu
def test_torch_search_on_cuda_equals_the_float64_brute_force():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    rng = np.random.default_rng(6)
    vectors = rng.standard_normal((5000, 64)).astype(np.float32)
    index = TorchFlatL2(64, "cuda", block_bytes=4 * 5000 * 100)
    index.add(vectors)
    distances, ids = index.search(vectors[:300], 40)
    expected_d, expected_ids = _brute_force(vectors[:300], vectors, 40)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-3)


def test_faiss_gpu_copies_go_to_this_process_s_own_gpu(monkeypatch):
    """The exact index and k-means's assignment index go to one GPU, torch's current device
    (device 0 where torch has not started CUDA), through faiss's `index_cpu_to_gpus_list`;
    faiss's `index_cpu_to_all_gpus` and `Kmeans(gpu=True)` would put a copy on every GPU the
    process sees, the other ranks' on a node included. (faiss-gpu is not here: its cloner is
    replaced by one that records the devices and keeps the CPU index.)"""
    import faiss

    from pipeline.exact_search import faiss_kmeans

    asked = []

    def to_gpus(index, co=None, gpus=None, ngpu=-1):
        asked.append(list(gpus))
        return index

    monkeypatch.setattr(faiss, "index_cpu_to_gpus_list", to_gpus)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda *a, **k: pytest.fail("all GPUs"))
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    points = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
    index = flat_l2_index(points, use_gpu=True, k=5)
    assert index.ntotal == 500 and asked == [[0]]
    kmeans = faiss_kmeans(8, 7, on_gpu=True, niter=10, seed=3, verbose=False)
    kmeans.train(points)
    assert asked == [[0], [0]]
    reference = faiss.Kmeans(8, 7, niter=10, seed=3, verbose=False)  # (same algorithm, same seed)
    reference.train(points)
    np.testing.assert_array_equal(kmeans.centroids, reference.centroids)
