"""Batch planners: a sub-batch is a list of example ids chosen by a sampler that knows labels.

A planner maps a *plan index* (the i-th sub-batch of the run, over all ranks) to ids. The
planners here are pure functions of (seed, index), so any decode actor can plan any sub-batch,
a resumed run replays the same plan, and which rank receives a sub-batch does not matter: each
one is self-contained (whole P x M groups). Planners that follow the model (Magnet
neighbourhoods, PDDM pools) implement the same `plan(index)` and fetch their newest index from
the refresh actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class BatchPlanner(Protocol):
    """Anything that turns a plan index into the example ids of one sub-batch."""

    def plan(self, index: int) -> np.ndarray:
        """Example ids (int64) of sub-batch `index`; always the same length."""
        ...


@dataclass
class ClassTable:
    """Example ids grouped by class: `ids[offsets[c]:offsets[c + 1]]` are class c's examples."""

    classes: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> ClassTable:
        """Build from `labels[id]` (ids are the dense positions 0..N-1)."""
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
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
    table: ClassTable = field(init=False, repr=False)

    def __post_init__(self):
        self.table = ClassTable.from_labels(self.labels)
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

    def plan(self, index: int) -> np.ndarray:
        round_index, group = divmod(index, self.groups_per_round)
        order = np.random.default_rng([self.seed, round_index]).permutation(len(self.table.classes))
        chosen = order[group * self.classes_per_batch : (group + 1) * self.classes_per_batch]
        rng = np.random.default_rng([self.seed, round_index, group, 1])
        picks = []
        for position in chosen:
            members = self.table.members(position)
            replace = len(members) < self.samples_per_class
            picks.append(rng.choice(members, self.samples_per_class, replace=replace))
        return np.concatenate(picks)


@dataclass
class ShufflePlanner:
    """Plain epochs: a seeded permutation of all ids per epoch, cut into sub-batches (last dropped)."""

    num_examples: int
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        if self.num_examples < self.batch_size:
            raise ValueError(
                f"sampler.batch_size: {self.batch_size} exceeds the {self.num_examples} training examples"
            )
        self.batches_per_epoch = self.num_examples // self.batch_size

    def plan(self, index: int) -> np.ndarray:
        epoch, position = divmod(index, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return order[position * self.batch_size : (position + 1) * self.batch_size].astype(np.int64)


def build_planner(sampler_config, labels: np.ndarray, seed: int) -> BatchPlanner:
    """The planner named by `sampler.name`, over the training labels (indexed by id)."""
    if sampler_config.name == "m_per_class":
        return MPerClassPlanner(
            labels, sampler_config.classes_per_batch, sampler_config.samples_per_class, seed
        )
    if sampler_config.name == "shuffle":
        return ShufflePlanner(len(labels), sampler_config.batch_size, seed)
    raise ValueError(f"sampler.name: unknown sampler {sampler_config.name!r}")
