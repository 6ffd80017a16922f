"""Batch planners: composition, determinism, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.planning import ClassTable, MPerClassPlanner, ShufflePlanner


def _labels(sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


def test_m_per_class_composition():
    labels = _labels([10, 7, 3, 12, 5, 9])  # class 2 has fewer than M examples
    planner = MPerClassPlanner(labels, classes_per_batch=3, samples_per_class=4, seed=1)
    for index in range(20):
        ids = planner.plan(index)
        assert ids.shape == (12,)
        groups = labels[ids].reshape(3, 4)
        assert (groups == groups[:, :1]).all(), "each group of M must be one class"
        assert len(set(groups[:, 0])) == 3, "P distinct classes"
        for group_ids in ids.reshape(3, 4):
            if labels[group_ids[0]] != 2:
                assert len(set(group_ids)) == 4, "no repeats when the class has >= M examples"


def test_m_per_class_visits_every_class_once_per_round():
    labels = _labels([6] * 10)
    planner = MPerClassPlanner(labels, classes_per_batch=2, samples_per_class=2, seed=0)
    rounds = planner.groups_per_round
    seen = np.concatenate([labels[planner.plan(i)][::2] for i in range(rounds)])
    assert sorted(seen) == list(range(10))


def test_planners_are_pure_functions_of_seed_and_index():
    labels = _labels([8] * 12)
    a = MPerClassPlanner(labels, 4, 2, seed=3)
    b = MPerClassPlanner(labels, 4, 2, seed=3)
    c = MPerClassPlanner(labels, 4, 2, seed=4)
    assert all((a.plan(i) == b.plan(i)).all() for i in range(10))
    assert any((a.plan(i) != c.plan(i)).any() for i in range(10))


def test_shuffle_covers_each_epoch_without_repeats():
    planner = ShufflePlanner(num_examples=50, batch_size=8, seed=0)
    epoch = np.concatenate([planner.plan(i) for i in range(planner.batches_per_epoch)])
    assert len(epoch) == 48 and len(set(epoch)) == 48
    next_epoch = np.concatenate([planner.plan(i + planner.batches_per_epoch) for i in range(6)])
    assert not (epoch == next_epoch).all()


def test_a_shuffle_plan_does_not_depend_on_what_was_planned_before():
    """The planner keeps the current epoch's permutation; a decode actor that asks in any
    order, or gets a pickled copy, must plan the same sub-batches as one asked in order."""
    import pickle

    in_order = ShufflePlanner(num_examples=50, batch_size=8, seed=3)
    indices = list(range(3 * in_order.batches_per_epoch))
    expected = [in_order.plan(i).copy() for i in indices]
    in_order.plan(0)[:] = -1  # a caller's writes do not reach the kept permutation
    shuffled = pickle.loads(pickle.dumps(in_order))
    assert shuffled._epoch_order is None  # an epoch's permutation does not travel to the actors
    for i in np.random.default_rng(0).permutation(indices):
        np.testing.assert_array_equal(shuffled.plan(int(i)), expected[i])
    np.testing.assert_array_equal(in_order.plan(0), expected[0])


def test_class_table_groups_ids():
    labels = np.array([2, 0, 2, 1, 0])
    table = ClassTable.from_labels(labels)
    assert table.classes.tolist() == [0, 1, 2]
    assert [sorted(table.members(i).tolist()) for i in range(3)] == [[1, 4], [3], [0, 2]]


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="sampler.classes_per_batch: 5 classes per batch"):
        MPerClassPlanner(_labels([4, 4]), classes_per_batch=5, samples_per_class=2)
