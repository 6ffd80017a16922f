"""The Magnet cluster index (faiss k-means per class, impostor table) and the seed weights."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.refresh.cluster_index import (
    build_cluster_index,
    cluster_seed_weights,
    kmeans_assign,
    nearest_other_class,
)


def _blobs(rng, centers, per_blob, spread=0.05):
    points = np.concatenate([c + spread * rng.standard_normal((per_blob, len(c))) for c in centers])
    return points.astype(np.float32), np.repeat(np.arange(len(centers)), per_blob)


def test_kmeans_recovers_separated_modes():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)) * 5
    points, mode = _blobs(rng, centers, 20)
    centroids, assignment = kmeans_assign(points, 3, seed=1)
    assert centroids.shape == (3, 8)
    # Each true mode lands in exactly one cluster and each cluster holds one mode.
    for m in range(3):
        assert len(np.unique(assignment[mode == m])) == 1
    assert len(np.unique(assignment)) == 3


def test_class_with_fewer_than_k_examples_gets_one_cluster_per_example():
    points = np.arange(6, dtype=np.float32).reshape(3, 2)
    centroids, assignment = kmeans_assign(points, 8, seed=0)
    np.testing.assert_array_equal(centroids, points)
    np.testing.assert_array_equal(assignment, [0, 1, 2])


def test_duplicate_points_never_leave_an_empty_cluster():
    points = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32), 10, axis=0)
    centroids, assignment = kmeans_assign(points, 5, seed=0)
    assert len(centroids) == len(np.unique(assignment))
    assert np.bincount(assignment).min() > 0


def test_index_structure_and_held_out_ids():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), [30, 30, 3, 30, 1])  # two classes smaller than K
    embeddings = rng.standard_normal((len(labels), 4)).astype(np.float32)
    labels_with_holdout = labels.copy()
    labels_with_holdout[[0, 40]] = -1
    index, seconds = build_cluster_index(
        embeddings, labels_with_holdout, clusters_per_class=4, num_impostors=3, version=7, model_step=11
    )
    assert seconds >= 0 and index.version == 7 and index.model_step == 11
    sizes = np.bincount(index.cluster_class)
    np.testing.assert_array_equal(sizes, [4, 4, 3, 4, 1])
    assert index.assignment[0] == -1 and index.assignment[40] == -1
    clustered = np.flatnonzero(index.assignment >= 0)
    assert len(clustered) == len(labels) - 2
    # Every example's cluster is of its own class, and members/offsets list exactly them.
    np.testing.assert_array_equal(index.cluster_class[index.assignment[clustered]], labels[clustered])
    for k in range(index.num_clusters):
        members = index.cluster_members(k)
        assert len(members) > 0
        assert (index.assignment[members] == k).all()
    assert index.cluster_sizes.sum() == len(clustered)
    # Centroids are the means of their members (k-means fixed point after the final assignment
    # is not guaranteed, but a singleton cluster's centroid is its point).
    for k in np.flatnonzero(index.cluster_sizes == 1):
        np.testing.assert_allclose(index.centroids[k], embeddings[index.cluster_members(k)[0]], atol=1e-6)


def test_impostors_are_the_nearest_other_class_clusters():
    rng = np.random.default_rng(2)
    centroids = rng.standard_normal((20, 3)).astype(np.float32)
    classes = rng.integers(0, 5, size=20)
    impostors = nearest_other_class(centroids, classes, 4)
    sq = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    for k in range(20):
        others = np.flatnonzero(classes != classes[k])
        expected = others[np.argsort(sq[k, others], kind="stable")][:4]
        np.testing.assert_array_equal(np.sort(sq[k, impostors[k]]), np.sort(sq[k, expected]))
        assert (classes[impostors[k]] != classes[k]).all()
        # Nearest first.
        assert (np.diff(sq[k, impostors[k]]) >= -1e-6).all()


def test_too_few_other_class_clusters_is_a_clear_error():
    centroids = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="fewer than the 3 impostors"):
        nearest_other_class(centroids, np.array([0, 0, 1]), 3)


def test_seed_weights_follow_cluster_mean_losses():
    assignment = np.array([0, 0, 1, 1, 2, 2, -1])
    loss = np.array([1.0, 3.0, 4.0, np.nan, np.nan, np.nan, 100.0], dtype=np.float32)
    weights = cluster_seed_weights(loss, assignment, 3, floor=0.01)
    # Cluster 0: mean 2; cluster 1: 4 (its unmeasured member ignored); cluster 2 never
    # measured: the mean of measured clusters, 3. The held-out id (-1) counts nowhere.
    np.testing.assert_allclose(weights, np.array([2.0, 4.0, 3.0]) / 9.0)


def test_seed_weights_floor_and_degenerate_cases_are_never_nan():
    assignment = np.array([0, 1, 2, 3])
    floor = cluster_seed_weights(np.array([0.0, 0.0, 0.0, 8.0]), assignment, 4, floor=0.01)
    assert (floor > 0).all() and np.isclose(floor.sum(), 1.0)
    np.testing.assert_allclose(floor[:3] / floor[3], 0.01 * 2.0 / 8.0)  # floor x mean (2.0)
    for loss in (np.full(4, np.nan), np.zeros(4), np.array([np.inf, np.nan, np.nan, np.nan])):
        weights = cluster_seed_weights(loss, assignment, 4, floor=0.01)
        assert np.isfinite(weights).all() and np.isclose(weights.sum(), 1.0)
        np.testing.assert_allclose(weights, 0.25)


def test_loss_totals_kept_per_sub_batch_give_the_weights_of_a_full_pass():
    """The refresh actor updates each cluster's loss sum and count as sub-batches report, and
    must end where `cluster_seed_weights` over all examples ends: through first measurements,
    re-measured examples, unclustered ids (-1) and a NaN loss."""
    from pipeline.refresh.cluster_index import ClusterLosses

    rng = np.random.default_rng(5)
    num, clusters = 400, 23
    assignment = rng.integers(-1, clusters, num)
    loss = np.full(num, np.nan, dtype=np.float32)
    totals = ClusterLosses(loss, assignment, clusters)
    for _ in range(60):
        ids = rng.choice(num, 24, replace=False)
        new = rng.exponential(size=24).astype(np.float32)
        new[rng.random(24) < 0.05] = np.nan
        totals.replace(ids, loss[ids], new)
        loss[ids] = new
        np.testing.assert_allclose(totals.seed_weights(0.05), cluster_seed_weights(loss, assignment, clusters, 0.05),
                                   rtol=1e-12, atol=0)
    assert np.isfinite(loss).sum() > num // 2  # most examples measured, several of them twice


def test_loss_totals_of_a_converged_run_give_the_uniform_draw():
    """A hinge loss is often exactly 0. Once every measured loss is 0 the draw is uniform (as
    `cluster_seed_weights` says), not shaped by what the totals' additions and subtractions
    of widely spread losses left over."""
    from pipeline.refresh.cluster_index import ClusterLosses

    rng = np.random.default_rng(12)  # a seed whose leftovers sum above 0 (half do)
    num, clusters = 2000, 50
    assignment = rng.integers(0, clusters, num)
    loss = rng.lognormal(0.0, 8.0, num).astype(np.float32)
    totals = ClusterLosses(loss, assignment, clusters)
    for _ in range(40):
        ids = rng.choice(num, 64, replace=False)
        new = rng.lognormal(0.0, 8.0, 64).astype(np.float32)
        totals.replace(ids, loss[ids], new)
        loss[ids] = new
    zeros = np.zeros(num, dtype=np.float32)
    totals.replace(np.arange(num), loss, zeros)
    np.testing.assert_array_equal(totals.seed_weights(0.05), np.full(clusters, 1.0 / clusters))
    np.testing.assert_array_equal(cluster_seed_weights(zeros, assignment, clusters, 0.05), np.full(clusters, 1.0 / clusters))
