"""Magnet's neighbourhood sampler: seeds follow the loss, impostors are nearest, D per cluster."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.data.neighbourhoods import TAG_SHIFT, PlanTables, sample_neighbourhoods
from pipeline.data.planning import seen_holdout_ids
from pipeline.refresh.cluster_index import build_cluster_index, cluster_seed_weights


def _tables(sizes=(30, 30, 30, 30), k=3, m=4, weights=None, seed=0) -> tuple[PlanTables, object, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    embeddings = rng.standard_normal((len(labels), 6)).astype(np.float32)
    index, _ = build_cluster_index(
        embeddings, labels, clusters_per_class=k, num_impostors=m - 1, version=3, model_step=5
    )
    if weights is None:
        weights = np.full(index.num_clusters, 1.0 / index.num_clusters)
    tables = PlanTables(
        version=index.version, model_step=index.model_step, tag=index.tag, members=index.members,
        offsets=index.offsets,
        cluster_class=index.cluster_class, impostors=index.impostors, weights=weights,
    )
    return tables, index, labels


def test_neighbourhood_is_seed_plus_nearest_impostors_with_d_each():
    tables, index, labels = _tables()
    ids, clusters = sample_neighbourhoods(tables, np.random.default_rng(0), count=5,
                                          clusters_per_neighbourhood=4, examples_per_cluster=3)
    assert ids.shape == (5 * 4 * 3,) and clusters.shape == ids.shape
    for n in range(5):
        block = clusters[n * 12 : (n + 1) * 12].reshape(4, 3)
        assert (block == block[:, :1]).all(), "D consecutive examples per cluster"
        chosen = block[:, 0]
        seed = chosen[0]
        np.testing.assert_array_equal(chosen[1:], index.impostors[seed, :3])
        assert (index.cluster_class[chosen[1:]] != index.cluster_class[seed]).all()
    # Every id belongs to the cluster it is labelled with.
    np.testing.assert_array_equal(index.assignment[ids], clusters)


def test_small_clusters_are_drawn_with_replacement_and_large_ones_without():
    tables, index, _ = _tables(sizes=(2, 30, 30, 30), k=2, m=3)
    rng = np.random.default_rng(1)
    saw_small = False
    for _ in range(200):
        ids, clusters = sample_neighbourhoods(tables, rng, 1, 3, 4)
        for cluster in np.unique(clusters):
            picked = ids[clusters == cluster]
            assert len(picked) == 4
            if index.cluster_sizes[cluster] >= 4:
                assert len(np.unique(picked)) == 4, "no repeats when the cluster has D members"
            else:
                saw_small = True
                assert set(picked) <= set(index.cluster_members(cluster))
    assert saw_small


def test_seed_frequency_follows_the_loss_weights():
    tables, index, _ = _tables()
    rng = np.random.default_rng(2)
    loss = rng.uniform(0.1, 2.0, size=len(index.assignment)).astype(np.float32)
    loss[index.cluster_members(0)] = 10.0  # one hard cluster
    tables.weights = cluster_seed_weights(loss, index.assignment, index.num_clusters, floor=0.01)
    draws = 4000
    ids, clusters = sample_neighbourhoods(tables, np.random.default_rng(3), draws, 4, 1)
    seeds = clusters.reshape(draws, 4)[:, 0]
    observed = np.bincount(seeds, minlength=index.num_clusters)
    expected = tables.weights * draws
    # Pearson chi-square against the loss-proportional distribution (fixed seed: deterministic).
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 0.01, (observed, expected)
    assert observed[0] == observed.max(), "the hardest cluster is seeded most often"
    # And it is *not* uniform: the same counts reject uniform seeding.
    _, p_uniform = stats.chisquare(observed, np.full(index.num_clusters, draws / index.num_clusters))
    assert p_uniform < 1e-6


def test_unmeasured_and_tiny_clusters_never_give_nan():
    tables, index, _ = _tables(sizes=(1, 1, 2, 30), k=4, m=3)
    loss = np.full(len(index.assignment), np.nan, dtype=np.float32)
    loss[index.cluster_members(index.num_clusters - 1)] = 0.0
    tables.weights = cluster_seed_weights(loss, index.assignment, index.num_clusters, floor=0.01)
    assert np.isfinite(tables.weights).all()
    ids, clusters = sample_neighbourhoods(tables, np.random.default_rng(0), 50, 3, 4)
    assert len(ids) == 50 * 12 and (ids >= 0).all()


def test_index_tag_keeps_clusters_of_different_indexes_apart():
    # The planner tags cluster ids with the index's random tag: equal ids only for the same
    # cluster of the same index, so sub-batches from two indexes can share a global batch.
    first, _, _ = _tables(seed=0)
    second, _, _ = _tables(seed=0)
    assert first.tag != second.tag and 0 <= first.tag < 2**31
    a = (np.int64(first.tag) << TAG_SHIFT) | np.int64(17)
    b = (np.int64(second.tag) << TAG_SHIFT) | np.int64(17)
    assert a != b and a & ((1 << TAG_SHIFT) - 1) == 17 and a > 0


def test_seen_holdout_is_per_class_seeded_and_keeps_two_to_train():
    labels = np.repeat(np.arange(4), [20, 10, 3, 2])
    held = seen_holdout_ids(labels, 0.2, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[held], minlength=4), [4, 2, 0, 0])
    np.testing.assert_array_equal(held, seen_holdout_ids(labels, 0.2, seed=0))
    assert len(seen_holdout_ids(labels, 0.0, seed=0)) == 0


def test_impostor_shortage_is_refused_before_training():
    from pipeline.config import ConfigError, load_config
    from pipeline.data.ray_datasets import check_neighbourhoods_fit

    config = load_config("magnet", ["loss.magnet.clusters_per_class=2", "loss.magnet.clusters_per_neighbourhood=6"])
    labels = np.repeat(np.arange(3), 10)  # 3 classes x 2 clusters: at most 4 impostors
    with pytest.raises(ConfigError, match="clusters_per_neighbourhood"):
        check_neighbourhoods_fit(config, labels, np.zeros(0, dtype=np.int64))
    check_neighbourhoods_fit(config, np.repeat(np.arange(4), 10), np.zeros(0, dtype=np.int64))
