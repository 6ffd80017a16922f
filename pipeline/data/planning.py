"""Batch planners: a sub-batch is a list of example ids chosen by a sampler that knows labels.

A planner maps a *plan index* (the i-th sub-batch of the run, over all ranks) to ids. The
planners here are pure functions of (seed, index), so any decode actor can plan any sub-batch,
a resumed run replays the same plan, and which rank receives a sub-batch does not matter: each
one is self-contained (whole P x M groups). Planners that follow the model (Magnet
neighbourhoods, PDDM's hard pools) implement the same `plan(index)` and fetch their newest index
from the refresh actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class PlannedBatch:
    """A sub-batch plan with more than ids: per-example extras the loss needs (Magnet's
    `clusters`) and scalars describing how it was planned (the index version it used)."""

    ids: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, int] = field(default_factory=dict)


class BatchPlanner(Protocol):
    """Anything that turns a plan index into the example ids of one sub-batch."""

    def plan(self, index: int) -> np.ndarray | PlannedBatch:
        """Example ids (int64) of sub-batch `index`, or a PlannedBatch; always the same length."""
        ...


def as_planned(result: np.ndarray | PlannedBatch) -> PlannedBatch:
    """Whatever a planner returned, as a PlannedBatch."""
    if isinstance(result, PlannedBatch):
        return result
    return PlannedBatch(np.asarray(result, dtype=np.int64))


@dataclass
class ClassTable:
    """Example ids grouped by class: `ids[offsets[c]:offsets[c + 1]]` are class c's examples."""

    classes: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray, exclude: np.ndarray | None = None) -> ClassTable:
        """Build from `labels[id]` (ids are the dense positions 0..N-1), leaving out the ids
        in `exclude` (a held-out part of the training classes)."""
        labels = np.asarray(labels)
        kept = np.arange(len(labels), dtype=np.int64)
        if exclude is not None and len(exclude):
            kept = np.setdiff1d(kept, exclude)
        order = kept[np.argsort(labels[kept], kind="stable")]
        classes, counts = np.unique(labels[order], return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(classes=classes, ids=order.astype(np.int64), offsets=offsets)

    def members(self, class_position: int) -> np.ndarray:
        """Ids of the class at position `class_position` of `classes`."""
        return self.ids[self.offsets[class_position] : self.offsets[class_position + 1]]

    @property
    def sizes(self) -> np.ndarray:
        """Examples per class, aligned with `classes`."""
        return np.diff(self.offsets)


@dataclass
class MPerClassPlanner:
    """P classes x M examples per sub-batch.

    Classes are visited in rounds: each round is a seeded permutation of all classes, cut
    into groups of P, so every class appears once per round. Within a class, M examples are
    drawn without replacement, or with replacement when the class has fewer than M.
    """

    labels: np.ndarray
    classes_per_batch: int
    samples_per_class: int
    seed: int = 0
    exclude: np.ndarray | None = None
    """Ids never planned (the seen-class hold-out)."""
    table: ClassTable = field(init=False, repr=False)

    def __post_init__(self):
        self.table = ClassTable.from_labels(self.labels, self.exclude)
        if len(self.table.classes) < self.classes_per_batch:
            raise ValueError(
                f"sampler.classes_per_batch: {self.classes_per_batch} classes per batch but the "
                f"training split has only {len(self.table.classes)} classes"
            )
        self.groups_per_round = len(self.table.classes) // self.classes_per_batch

    @property
    def batch_size(self) -> int:
        """Examples per sub-batch."""
        return self.classes_per_batch * self.samples_per_class

    def chosen_classes(self, index: int) -> np.ndarray:
        """Positions (in `table.classes`) of the P classes of sub-batch `index`."""
        round_index, group = divmod(index, self.groups_per_round)
        order = np.random.default_rng([self.seed, round_index]).permutation(len(self.table.classes))
        return order[group * self.classes_per_batch : (group + 1) * self.classes_per_batch]

    def plan(self, index: int) -> np.ndarray:
        return self.plan_with_classes(index)[0]

    def plan_with_classes(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, class positions) of sub-batch `index`: `plan` and `chosen_classes` in one pass."""
        round_index, group = divmod(index, self.groups_per_round)
        rng = np.random.default_rng([self.seed, round_index, group, 1])
        chosen = self.chosen_classes(index)
        picks = []
        for position in chosen:
            members = self.table.members(position)
            replace = len(members) < self.samples_per_class
            picks.append(rng.choice(members, self.samples_per_class, replace=replace))
        return np.concatenate(picks), chosen


@dataclass
class ShufflePlanner:
    """Plain epochs: a seeded permutation of all ids per epoch, cut into sub-batches (last dropped)."""

    num_examples: int
    batch_size: int
    seed: int = 0
    exclude: np.ndarray | None = None
    """Ids never planned (the seen-class hold-out)."""

    def __post_init__(self):
        self.ids = np.arange(self.num_examples, dtype=np.int64)
        if self.exclude is not None and len(self.exclude):
            self.ids = np.setdiff1d(self.ids, self.exclude)
        if len(self.ids) < self.batch_size:
            raise ValueError(
                f"sampler.batch_size: {self.batch_size} exceeds the {len(self.ids)} training examples"
            )
        self.batches_per_epoch = len(self.ids) // self.batch_size
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        # A decode actor draws its own epoch's permutation: the cache does not travel.
        return {**self.__dict__, "_epoch_order": None}

    def plan(self, index: int) -> np.ndarray:
        epoch, position = divmod(index, self.batches_per_epoch)
        # Sub-batches are planned nearly in order, so the epoch's permutation (O(N): 11 ms at
        # 1M ids) is drawn once per epoch and kept, not once per sub-batch.
        cached = self._epoch_order
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.ids))
            self._epoch_order = cached
        return cached[1][position * self.batch_size : (position + 1) * self.batch_size].copy()


def seen_holdout_ids(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Ids held out of training in each training class (a seeded `fraction` of the class,
    rounded down; a class always keeps at least 2 examples to train on). Sorted int64."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    table = ClassTable.from_labels(labels)
    rng = np.random.default_rng([seed, 7])
    held = []
    for position, size in enumerate(table.sizes):
        count = min(int(fraction * size), max(0, int(size) - 2))
        if count:
            held.append(rng.choice(table.members(position), count, replace=False))
    return np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)


def build_planner(config, labels: np.ndarray, exclude: np.ndarray | None = None, refresh_actor: str = "",
                  refresh_every_steps: int = 1) -> BatchPlanner:
    """The planner named by `sampler.name`, over the training labels (indexed by id).

    `exclude` are ids never planned (the seen-class hold-out); `refresh_actor` names the
    refresh actor that model-following planners (neighbourhoods, hard_pools) read their index
    from, and `refresh_every_steps` is its resolved period (where lagged planning looks).
    """
    sampler, seed = config.sampler, config.train.seed
    if sampler.name == "m_per_class":
        return MPerClassPlanner(labels, sampler.classes_per_batch, sampler.samples_per_class, seed, exclude)
    if sampler.name == "shuffle":
        return ShufflePlanner(len(labels), sampler.batch_size, seed, exclude)
    if sampler.name in ("neighbourhoods", "hard_pools"):
        from pipeline.data.actor_tables import ActorTables

        source = ActorTables(
            refresh_actor, max_ahead_steps=config.refresh.max_plan_ahead_steps,
            lag_steps=config.refresh.lag_steps, every_steps=refresh_every_steps,
        )
    if sampler.name == "neighbourhoods":
        from pipeline.data.neighbourhoods import NeighbourhoodPlanner

        magnet = config.loss.magnet
        return NeighbourhoodPlanner(
            source=source,
            neighbourhoods=magnet.neighbourhoods_per_rank,
            num_ranks=config.train.num_workers,
            clusters_per_neighbourhood=magnet.clusters_per_neighbourhood,
            examples_per_cluster=magnet.examples_per_cluster,
            seed=seed,
        )
    if sampler.name == "hard_pools":
        from pipeline.data.pool_batches import HardPoolPlanner

        classes = MPerClassPlanner(labels, sampler.classes_per_batch, sampler.samples_per_class, seed, exclude)
        return HardPoolPlanner(source, classes, sampler.pool_draws_per_class, config.train.num_workers, seed)
    raise ValueError(f"sampler.name: unknown sampler {sampler.name!r}")
