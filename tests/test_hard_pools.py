"""PDDM's hard-negative pools: faiss's answer against brute force over the full set."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.refresh import hard_pools
from pipeline.refresh.hard_pools import build_hard_pools, hard_negative_pools


def _brute_force(embeddings, labels, pool_size):
    """Every class's pool by definition: other-class examples ranked by the float64 squared
    distance to the class's nearest member, ties by id."""
    x = embeddings.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    pools = {}
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        others = np.flatnonzero((labels >= 0) & (labels != c))
        to_class = d[np.ix_(others, members)].min(axis=1)
        ranked = np.lexsort((others, to_class))[:pool_size]
        pools[int(c)] = (others[ranked], to_class[ranked])
    return pools


def _data(n_classes=12, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 30, n_classes)  # uneven classes, a pool larger than some classes
    labels = np.repeat(np.arange(n_classes), sizes)
    rng.shuffle(labels)
    centers = rng.standard_normal((n_classes, dim))
    embeddings = (centers[labels] * 0.7 + rng.standard_normal((len(labels), dim))).astype(np.float32)
    return embeddings, labels


@pytest.mark.parametrize("pool_size", [1, 7, 40])
def test_pools_are_each_classes_true_nearest_other_class_examples(pool_size):
    embeddings, labels = _data()
    classes, members, offsets, distances = hard_negative_pools(embeddings, labels, pool_size)
    expected = _brute_force(embeddings, labels, pool_size)
    assert list(classes) == sorted(expected)
    for p, c in enumerate(classes):
        ids, dist = expected[int(c)]
        got = members[offsets[p] : offsets[p + 1]]
        np.testing.assert_array_equal(got, ids)
        np.testing.assert_allclose(distances[offsets[p] : offsets[p + 1]], dist, rtol=1e-4, atol=1e-4)
        assert not np.any(labels[got] == c)


def test_pools_from_the_torch_search_are_the_true_pools(torch_search_on_cpu):
    # The exact search a CUDA machine without faiss-gpu runs (pipeline.exact_search).
    embeddings, labels = _data(seed=3)
    classes, members, offsets, distances = hard_negative_pools(embeddings, labels, 11, use_gpu=True)
    expected = _brute_force(embeddings, labels, 11)
    for p, c in enumerate(classes):
        np.testing.assert_array_equal(members[offsets[p] : offsets[p + 1]], expected[int(c)][0])
        np.testing.assert_allclose(distances[offsets[p] : offsets[p + 1]], expected[int(c)][1], rtol=1e-4, atol=1e-4)


def test_held_out_ids_are_neither_pooled_nor_searched_from_and_chunks_change_nothing(monkeypatch):
    embeddings, labels = _data(seed=1)
    held = labels.copy()
    held[::5] = -1
    whole = hard_negative_pools(embeddings, held, 9)
    monkeypatch.setattr(hard_pools, "QUERY_ROWS", 20)  # many search calls, classes never split
    chunked = hard_negative_pools(embeddings, held, 9)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)
    expected = _brute_force(embeddings, held, 9)
    classes, members, offsets, _ = whole
    for p, c in enumerate(classes):
        np.testing.assert_array_equal(members[offsets[p] : offsets[p + 1]], expected[int(c)][0])
    assert not np.isin(members, np.flatnonzero(held < 0)).any()


def test_each_search_goes_only_as_deep_as_its_largest_class_needs(monkeypatch):
    """Depth pool_size + |c| finds class c's pool (module docstring), so a chunk of small
    classes must not search as deep as the largest class of the set."""
    embeddings, labels = _data(n_classes=30, seed=4)
    sizes = np.bincount(labels)
    searches = []
    make_index = hard_pools._search_index

    def recording_index(*args):
        index = make_index(*args)

        class Recording:
            def search(self, queries, k):
                searches.append((len(queries), k))
                return index.search(queries, k)

        return Recording()

    monkeypatch.setattr(hard_pools, "_search_index", recording_index)
    monkeypatch.setattr(hard_pools, "QUERY_ROWS", 40)
    classes, members, offsets, _ = hard_negative_pools(embeddings, labels, 5)
    expected = _brute_force(embeddings, labels, 5)
    for p, c in enumerate(classes):
        np.testing.assert_array_equal(members[offsets[p] : offsets[p + 1]], expected[int(c)][0])
    assert sum(rows for rows, _ in searches) == len(labels)
    assert max(k for _, k in searches) == 5 + sizes.max()
    assert min(k for _, k in searches) <= 5 + np.sort(sizes)[len(sizes) // 2]  # small classes searched shallow

    # An approximate index keeps the full depth: HNSW searches max(efSearch, k) candidates, so a
    # shallower search would return worse pools, not a prefix of the same ones.
    searches.clear()
    hard_negative_pools(embeddings, labels, 5, index_description="HNSW32", search_params="efSearch=16")
    assert {k for _, k in searches} == {5 + sizes.max()}


def test_the_index_carries_version_step_and_rejects_bad_input():
    embeddings, labels = _data(n_classes=3)
    index, seconds = build_hard_pools(embeddings, labels, 5, version=4, model_step=30)
    assert (index.version, index.model_step) == (4, 30) and seconds >= 0
    assert len(index.pool(0)) == 5 and index.tag >= 0
    with pytest.raises(ValueError, match="pool_size"):
        hard_negative_pools(embeddings, labels, 0)
    with pytest.raises(ValueError, match="two classes"):
        hard_negative_pools(embeddings, np.zeros_like(labels), 3)


class _FixedSource:
    """Stands in for `ActorTables` (the refresh actor's side is tested end to end on Ray)."""

    def __init__(self, tables):
        self.tables = tables
        self.steps = []

    def current_tables(self, step=0):
        self.steps.append(step)
        return self.tables


def test_planner_adds_draws_from_each_batch_class_pool():
    from pipeline.data.planning import MPerClassPlanner
    from pipeline.data.pool_batches import HardPoolPlanner, PoolTables

    embeddings, labels = _data(n_classes=10, seed=2)
    index, _ = build_hard_pools(embeddings, labels, pool_size=6, version=3, model_step=12)
    tables = PoolTables(index.version, index.model_step, index.tag, index.classes, index.members, index.offsets)
    classes = MPerClassPlanner(labels, classes_per_batch=4, samples_per_class=3, seed=5)
    source = _FixedSource(tables)
    planner = HardPoolPlanner(source, classes, draws_per_class=5, num_ranks=2, seed=5)

    for plan_index in range(6):
        planned = planner.plan(plan_index)
        base = classes.plan(plan_index)
        assert len(planned.ids) == 4 * (3 + 5)
        np.testing.assert_array_equal(planned.ids[:12], base)  # the m_per_class part, unchanged
        chosen = classes.table.classes[classes.chosen_classes(plan_index)]
        for n, label in enumerate(chosen):
            draws = planned.ids[12 + 5 * n : 12 + 5 * (n + 1)]
            assert np.isin(draws, index.pool(int(label))).all()  # pool of 6 > 5: no repeats
            assert len(set(draws)) == 5 and not np.any(labels[draws] == label)
        assert planned.info == {"index_version": 3, "index_step": 12}
    assert source.steps == [0, 0, 1, 1, 2, 2]  # plan index // ranks: the step it is for
    np.testing.assert_array_equal(planner.plan(4).ids, planner.plan(4).ids)  # seeded


def test_small_pools_are_drawn_with_replacement_and_missing_pools_refused():
    from pipeline.data.pool_batches import PoolTables, add_pool_draws

    tables = PoolTables(1, 0, 7, classes=np.array([0, 2]), members=np.array([5, 6, 9]), offsets=np.array([0, 2, 3]))
    rng = np.random.default_rng(0)
    ids = add_pool_draws(np.array([1, 2]), np.array([0, 2]), tables, 3, rng)
    assert len(ids) == 8 and set(ids[2:5]) <= {5, 6} and list(ids[5:]) == [9, 9, 9]
    with pytest.raises(ValueError, match="class 1 has no hard-negative pool"):
        add_pool_draws(np.array([1]), np.array([1]), tables, 2, rng)


def _clustered(n_classes=40, per_class=25, dim=16, seed=3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    rng.shuffle(labels)
    centers = rng.standard_normal((n_classes, dim))
    return (centers[labels] + 0.6 * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def test_an_ivf_search_of_every_list_finds_the_exact_pools():
    embeddings, labels = _clustered()
    exact = hard_negative_pools(embeddings, labels, 12)
    every_list = hard_negative_pools(embeddings, labels, 12, index_description="IVF8,Flat", search_params="nprobe=8")
    for a, b in zip(exact[:3], every_list[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(exact[3], every_list[3], rtol=1e-5, atol=1e-5)


def _overlap(a, b):
    """Mean over classes of the share of pool a's members that pool b also has."""
    shares = [len(np.intersect1d(a[1][a[2][p] : a[2][p + 1]], b[1][b[2][p] : b[2][p + 1]])) / (a[2][p + 1] - a[2][p])
              for p in range(len(a[0]))]
    return float(np.mean(shares))


@pytest.mark.parametrize("description, params", [("IVF16,Flat", "nprobe=1"), ("HNSW4", "efSearch=4")])
def test_an_approximate_search_keeps_every_pool_full_and_of_other_classes(description, params):
    embeddings, labels = _clustered()
    held = labels.copy()
    held[::7] = -1
    exact = hard_negative_pools(embeddings, held, 30)
    approx = hard_negative_pools(embeddings, held, 30, index_description=description, search_params=params)
    classes, members, offsets, distances = approx
    np.testing.assert_array_equal(classes, exact[0])
    np.testing.assert_array_equal(np.diff(offsets), np.diff(exact[2]))  # short pools were filled
    for p, c in enumerate(classes):
        pool = members[offsets[p] : offsets[p + 1]]
        assert len(set(pool)) == len(pool) and not np.any(held[pool] == c) and not np.any(held[pool] < 0)
        d = distances[offsets[p] : offsets[p + 1]]
        assert np.all(np.diff(d) >= 0)  # nearest first
        true = ((embeddings[pool, None, :].astype(np.float64) - embeddings[held == c][None]) ** 2).sum(-1).min(1)
        # The distance to the nearest member whose search found it: never below the true one.
        assert np.all(d >= true - 1e-4)
    assert 0.3 < _overlap(exact, approx) < 1.0  # approximate: most, not all, of the true members


def test_the_short_pools_an_approximate_search_leaves_are_rebuilt_exactly(monkeypatch):
    embeddings, labels = _clustered(seed=4)
    exact = hard_negative_pools(embeddings, labels, 20)
    # A search that finds only the query itself leaves every class with an empty pool...
    monkeypatch.setattr(hard_pools, "_rank_candidates", _keep_first_class_only(hard_pools._rank_candidates))
    # ...except class 0: the fill rebuilds the rest with the exact search.
    filled = hard_negative_pools(embeddings, labels, 20, index_description="IVF4,Flat", search_params="nprobe=4")
    for a, b in zip(exact[:3], filled[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def _keep_first_class_only(rank):
    calls = []

    def ranked(query_class, *args):
        cls, ids, dist = rank(query_class, *args)
        calls.append(len(calls))
        if len(calls) == 1:  # the approximate pass: drop every class but the smallest label
            keep = cls == cls.min()
            return cls[keep], ids[keep], dist[keep]
        return cls, ids, dist

    return ranked


def test_bad_pool_index_settings_are_named():
    embeddings, labels = _clustered()
    with pytest.raises(ValueError, match="'IVFx'.*cannot build"):
        hard_negative_pools(embeddings, labels, 5, index_description="IVFx")
    with pytest.raises(ValueError, match="'efSearch=8' do not apply to a 'IVF8,Flat'"):
        hard_negative_pools(embeddings, labels, 5, index_description="IVF8,Flat", search_params="efSearch=8")
    with pytest.raises(ValueError, match="needs at least 2000 training vectors, the pools have 1000"):
        hard_negative_pools(embeddings, labels, 5, index_description="IVF2000,Flat")


def test_an_ivf_index_too_large_for_the_training_split_is_refused_before_training():
    from pipeline.config import load_config
    from pipeline.data.ray_datasets import check_pool_index_fits

    config = load_config("pddm", ["refresh.pool_index=IVF256,Flat", "refresh.pool_search_params=nprobe=16"])
    with pytest.raises(ValueError, match=r"refresh.pool_index: 'IVF256,Flat' .* 255 pooled images but needs at least 256"):
        check_pool_index_fits(config, 255)
    check_pool_index_fits(config, 256)
    check_pool_index_fits(load_config("pddm", ["refresh.pool_index=HNSW32"]), 10)  # nothing to train
