"""Training streams reach their ranks in plan order.

The shared stream (planners that do not follow the model) is dealt out to the ranks the same
way in every run, whatever order the decode actors finish in: every run of a config and seed
then trains on the same global batches.

A per-rank stream reaches its rank in plan order, so a planner that holds back (Magnet's
neighbourhoods, PDDM's pools) never blocks on a far step while the sub-batch training waits
for queues behind it.

The stream here has the shape of the real one (`plan_index_rows`, one row per block, then a
decode actor that holds back like `ActorTables`), with a task of random length in between,
so results reach the actor out of order as they may on a busy cluster (the real stream fuses
its read into the decode actors, which then make their plan indices themselves). It goes through Ray Train's
own `DataConfig.configure` with the driver's `trainer_data_config`. Found in the claims sweep,
where a PDDM run lost 120 s (`ActorTables.max_wait_s`) on every step after step 23.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from short_runs import SHORT_MAGNET, SHORT_RUN, TINY_BUILT_IN

from pipeline.config import load_config
from pipeline.data.planning import as_planned, build_planner
from pipeline.data.ray_datasets import SHARED_STREAM_BLOCK, build_training_data, plan_index_rows
from pipeline.evaluation.protocol import resolve_evaluation
from pipeline.training.driver import resolve_dataset, trainer_data_config

PREFETCH = 4
WINDOW = PREFETCH + 2  # the smallest refresh.max_plan_ahead_steps the config accepts
COUNT = 24


def test_a_per_rank_stream_arrives_in_plan_order_without_stalling_its_planner(ray_local):
    import ray
    import ray.data

    # Defined here, so that Ray pickles them by value (workers cannot import this module).
    def _jitter(batch):
        import random

        time.sleep(random.random() * 0.6)  # read tasks of uneven length, finishing in any order
        return batch

    class _HoldingBack:
        """Plans sub-batch i only once training has reported step i - WINDOW (like ActorTables),
        and counts the times it had to give up waiting."""

        def __init__(self, give_up_s: float):
            import ray

            self.steps = ray.get_actor("plan_order_steps")
            self.give_up_s = give_up_s
            self.gave_up = 0

        def __call__(self, batch):
            import ray

            index = int(batch["id"][0])
            deadline = time.monotonic() + self.give_up_s
            while index > ray.get(self.steps.latest.remote()) + WINDOW:
                if time.monotonic() > deadline:
                    self.gave_up += 1
                    break
                time.sleep(0.01)
            return {"id": batch["id"], "gave_up": np.array([self.gave_up])}

    @ray.remote(num_cpus=0)
    class Steps:
        def __init__(self):
            self.step = -1

        def report(self, step):
            self.step = max(self.step, step)

        def latest(self):
            return self.step

    steps = Steps.options(name="plan_order_steps").remote()
    try:
        stream = plan_index_rows(COUNT, COUNT).map_batches(
            _jitter, batch_size=1, num_cpus=0.25
        ).map_batches(
            _HoldingBack, fn_constructor_kwargs={"give_up_s": 20.0}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        )
        config = trainer_data_config(SimpleNamespace(train=[stream]))
        [shard] = config.configure({"train_0": stream}, world_size=1, worker_handles=None, worker_node_ids=None)
        seen, gave_up = [], 0
        for step, batch in enumerate(shard["train_0"].iter_batches(
                batch_size=1, batch_format="numpy", prefetch_batches=PREFETCH)):
            seen.append(int(batch["id"][0]))
            gave_up = max(gave_up, int(batch["gave_up"][0]))
            ray.get(steps.report.remote(step))  # training reports the step it finished
    finally:
        ray.kill(steps)
    assert seen == list(range(COUNT)), "the stream reached its rank out of plan order"
    assert gave_up == 0, f"the planner gave up waiting {gave_up} times: it blocked on a step training could not reach"


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_training_stream_is_ordered(ranks):
    per_rank = trainer_data_config(SimpleNamespace(train=[object()] * ranks))
    names = [f"train_{r}" for r in range(ranks)]
    assert all(per_rank._resolve_execution_options(name).preserve_order for name in names)
    assert not set(per_rank._datasets_to_split) & set(names)  # each rank reads its own stream whole
    split = trainer_data_config(SimpleNamespace(train=object()))
    assert "train" in split._datasets_to_split
    assert split._resolve_execution_options("train").preserve_order


def test_every_run_deals_the_shared_stream_to_the_ranks_the_same_way(ray_local, tmp_path):
    """The driver's own training stream (3 decode actors, so blocks finish out of order), split
    for 2 ranks by Ray Train's `DataConfig.configure` and read by both ranks at once, twice;
    the run resumes at step 3, as a rerun does from a checkpoint there."""
    ranks, start_step = 2, 3
    config = load_config("local", [
        *SHORT_RUN, *TINY_BUILT_IN, f"data.cache_dir={tmp_path}", "train.steps_per_epoch=20",
        "data.decode_actors=3", "data.decode_cpus=0.25", f"train.num_workers={ranks}",
    ])
    root, metadata = resolve_dataset(config)
    config = resolve_evaluation(config, metadata)  # the test split's name, as the driver does
    planner = None
    deals = []
    for _ in range(2):
        data = build_training_data(config, root, start_step=start_step)
        assert not isinstance(data.train, list)  # m_per_class: the shared stream, not one per rank
        shards = trainer_data_config(data).configure(
            {"train": data.train}, world_size=ranks, worker_handles=None, worker_node_ids=None
        )
        received: dict[int, list[dict]] = {}

        def read(rank: int, shards=shards, received=received) -> None:  # one rank's loop, a sub-batch a step
            received[rank] = list(shards[rank]["train"].iter_batches(batch_size=1, batch_format="numpy"))

        threads = [threading.Thread(target=read, args=(rank,)) for rank in range(ranks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        planner = planner or build_planner(config, data.store.labels, data.holdout_ids)
        deal = {rank: [int(row["index"][0]) for row in received[rank]] for rank in range(ranks)}
        for rank in range(ranks):
            # In plan order; the last block is cut between the ranks to keep them equal, and
            # Ray's split may hand its pieces over in another order (the same in every run).
            head = deal[rank][:-SHARED_STREAM_BLOCK]
            assert head == sorted(head), f"rank {rank} received its sub-batches out of plan order"
            assert len(deal[rank]) == data.total_steps - start_step  # one a step, the same on every rank
            for row, index in zip(received[rank], deal[rank], strict=True):
                np.testing.assert_array_equal(row["ids"][0], as_planned(planner.plan(index)).ids)
        assert sorted(deal[0] + deal[1]) == list(range(start_step * ranks, data.total_steps * ranks))
        deals.append(deal)
    assert deals[0] == deals[1], "two runs paired other sub-batches in a global batch"
    # A finished run rerun as it was: nothing left to plan, an empty stream.
    assert build_training_data(config, root, start_step=data.total_steps).train.count() == 0


@pytest.mark.parametrize("preset", ["local", "magnet"])
def test_the_decode_actors_make_their_own_plan_indices(ray_local, tmp_path, capsys, preset):
    """The plan-index read is fused into the decode actors, in the shared stream and in the
    per-rank ones: no read task, and no Python process for it, per block. On 2 cores the
    separate read tasks (one per sub-batch in a per-rank stream) started processes that
    crowded the decode actors' own start-up: a short Magnet run's first step came 38.1 s after
    its start, 29.3 s with the read fused (medians of 6; benchmarks/README.md)."""
    settings = SHORT_MAGNET if preset == "magnet" else [*SHORT_RUN, *TINY_BUILT_IN]
    config = load_config(preset, [*settings, f"data.cache_dir={tmp_path}", "train.steps_per_epoch=4"])
    root, metadata = resolve_dataset(config)
    config = resolve_evaluation(config, metadata)
    data = build_training_data(config, root, refresh_actor="not-started")  # planned lazily: no actor needed
    streams = data.train if isinstance(data.train, list) else [data.train]
    assert len(streams) == (config.train.num_workers if preset == "magnet" else 1)
    for stream in streams:
        capsys.readouterr()
        stream.explain()
        plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
        assert "ActorPoolMapOperator[ReadRange->MapBatches(TrainBatchDecoder)]" in plan, plan
        assert "TaskPoolMapOperator" not in plan, plan
