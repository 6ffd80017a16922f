"""Time the per-sub-batch bookkeeping that grows with the training set; prints one line of JSON.

Example: python benchmarks/planner_costs.py --num 1000000 --clusters 80000

- `shuffle`: `ShufflePlanner.plan` of the first sub-batch of an epoch (it draws the epoch's
  permutation of every id) and of the next ones (they slice the kept permutation).
- `seed_weights`: Magnet's seed weights from a pass over every example's loss
  (`cluster_seed_weights`, what each planner poll cost before `ClusterLosses`), and from the
  per-cluster totals after one sub-batch's update (`ClusterLosses.replace` + `seed_weights`,
  what the refresh actor does now).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from pipeline.data.planning import ShufflePlanner
from pipeline.refresh.cluster_index import ClusterLosses, cluster_seed_weights


def _mean_ms(fn, repeats: int) -> float:
    start = time.perf_counter()
    for i in range(repeats):
        fn(i)
    return round((time.perf_counter() - start) / repeats * 1e3, 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1_000_000, help="training examples")
    parser.add_argument("--clusters", type=int, default=80_000, help="Magnet clusters over all classes")
    parser.add_argument("--batch", type=int, default=256, help="examples per sub-batch")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    planner = ShufflePlanner(num_examples=args.num, batch_size=args.batch, seed=0)
    per_epoch = planner.batches_per_epoch
    # Each call the first of another epoch: the permutation is drawn every time.
    first = _mean_ms(lambda i: planner.plan(i * per_epoch), args.repeats)
    planner.plan(args.repeats * per_epoch)  # that epoch's permutation drawn: the calls below slice it
    kept = _mean_ms(lambda i: planner.plan(args.repeats * per_epoch + 1 + i), args.repeats)

    assignment = rng.integers(0, args.clusters, args.num)
    loss = rng.exponential(size=args.num).astype(np.float32)
    full_pass = _mean_ms(lambda i: cluster_seed_weights(loss, assignment, args.clusters, 0.05), args.repeats)
    totals = ClusterLosses(loss, assignment, args.clusters)

    def update(i: int) -> None:
        ids = rng.choice(args.num, args.batch, replace=False)
        new = rng.exponential(size=args.batch).astype(np.float32)
        totals.replace(ids, loss[ids], new)
        loss[ids] = new
        totals.seed_weights(0.05)

    incremental = _mean_ms(update, args.repeats)
    print(json.dumps({
        "machine": platform.node(), "processor": platform.processor(), "num": args.num,
        "clusters": args.clusters, "batch": args.batch,
        "shuffle_plan_ms": {"first_of_epoch": first, "next": kept},
        "seed_weights_ms": {"full_pass": full_pass, "totals_update_and_weights": incremental},
    }), flush=True)


if __name__ == "__main__":
    main()
