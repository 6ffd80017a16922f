"""How Ray Train hands the run's datasets to the ranks.

The training stream is split equally (every rank must take the same number of steps). The
evaluation splits are split too, so that each rank embeds a share of them, but never equally:
an equal split drops the rows that do not divide by the number of ranks, and a test set must
be evaluated whole.
"""

from __future__ import annotations

import ray.train

EVAL_DATASETS = ("test", "gallery", "seen")
"""The datasets every rank reads a share of at each evaluation (see `training.eval_shards`)."""


class RunDataConfig(ray.train.DataConfig):
    """Ray Train's `DataConfig`, with the evaluation splits split without dropping a row.

    Ray's own split of `datasets_to_split` is `streaming_split(equal=True)`. The evaluation
    datasets are listed there too, so Ray Train treats them as split (each rank gets its own
    iterator, created once for all ranks), and `configure` splits them with `equal=False`:
    every row reaches exactly one rank, and the shares may differ by a block.
    """

    def __init__(self, *, eval_datasets=EVAL_DATASETS, datasets_to_split=(), execution_options=None,
                 enable_shard_locality: bool = True):
        """datasets_to_split: the names of the training datasets split equally; eval_datasets:
        the names split without dropping rows (those of them a run has)."""
        if isinstance(datasets_to_split, str):
            raise TypeError(f"datasets_to_split: a list of dataset names, not {datasets_to_split!r}")
        self.eval_datasets = frozenset(eval_datasets)
        super().__init__(
            datasets_to_split=[*datasets_to_split, *sorted(self.eval_datasets)],
            execution_options=execution_options,
            enable_shard_locality=enable_shard_locality,
        )

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        """Ray's configuration of the training datasets, plus one share per rank of each
        evaluation dataset."""
        rest = {name: ds for name, ds in datasets.items() if name not in self.eval_datasets}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in datasets.items():
            if name not in self.eval_datasets:
                continue
            if dataset.name is None:
                dataset.set_name(name)
            # As Ray's own `configure` does (a shallow copy: the context is still shared).
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            if world_size == 1:  # the whole split, without a split coordinator actor to start
                output[0][name] = dataset.iterator()
                continue
            for rank, share in enumerate(dataset.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = share
        return output
