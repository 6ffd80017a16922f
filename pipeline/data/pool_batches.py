"""PDDM's batches with hard samples: P classes x Q examples, plus R examples drawn from each of
those classes' hard-negative pools (methods.md §2, "Hard-sample pools").

`add_pool_draws` is the pure sampler; `HardPoolPlanner` is the batch planner the decode actors
run, reading the newest pools from the refresh actor through `ActorTables`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.actor_tables import ActorTables
from pipeline.data.planning import MPerClassPlanner, PlannedBatch


@dataclass
class PoolTables:
    """The pools of one refresh (a `HardPoolIndex` without its distances)."""

    version: int
    model_step: int
    tag: int
    classes: np.ndarray
    """Class labels, sorted; `members[offsets[p]:offsets[p + 1]]` is the pool of `classes[p]`."""
    members: np.ndarray
    offsets: np.ndarray

    def pool_of(self, label: int) -> np.ndarray:
        """The pool of class `label` (empty if the class has none)."""
        p = int(np.searchsorted(self.classes, label))
        if p == len(self.classes) or self.classes[p] != label:
            return self.members[:0]
        return self.members[self.offsets[p] : self.offsets[p + 1]]


def add_pool_draws(
    base_ids: np.ndarray, class_labels: np.ndarray, tables: PoolTables, draws_per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """`base_ids` followed by `draws_per_class` ids from the pool of each class in `class_labels`
    (uniform, with replacement only when a pool is smaller than the draw)."""
    picks = [np.asarray(base_ids, dtype=np.int64)]
    for label in class_labels:
        pool = tables.pool_of(int(label))
        if len(pool) == 0:
            raise ValueError(f"class {label} has no hard-negative pool in index version {tables.version}")
        picks.append(rng.choice(pool, draws_per_class, replace=len(pool) < draws_per_class))
    return np.concatenate(picks)


@dataclass
class HardPoolPlanner:
    """P x Q from `classes` (the m_per_class plan of the same index), then R pool draws per class.

    Every sub-batch has P * (Q + R) ids. The P x Q part is the plain m_per_class plan; only the
    pool draws follow the model, and record which pool version they came from (`info`).
    """

    source: ActorTables
    classes: MPerClassPlanner
    draws_per_class: int
    num_ranks: int = 1
    """Sub-batches per training step: plan index i is trained at about step i // num_ranks."""
    seed: int = 0

    def plan(self, index: int) -> PlannedBatch:
        tables: PoolTables = self.source.current_tables(index // self.num_ranks)
        base, chosen = self.classes.plan_with_classes(index)
        rng = np.random.default_rng([self.seed, index, 2])
        ids = add_pool_draws(base, self.classes.table.classes[chosen], tables, self.draws_per_class, rng)
        return PlannedBatch(ids=ids, info={"index_version": tables.version, "index_step": tables.model_step})
