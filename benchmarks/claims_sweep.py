"""Run the claims sweep (`python -m jobs.sweep`, unchanged) in a local Ray instance with more
logical CPUs than `jobs.sweep` reserves on its own (4 on a 2-core machine), as the recorded runs
in benchmarks/README.md did: with 8, two trials share the 2 cores.

When the first of those runs was made, a Magnet or PDDM trial never trained with 4: the plan
stream's read tasks asked for a whole CPU each, and the trial's driver (1 CPU), its two workers
(1), one decode actor per rank (2 x 0.5) and the refresh actor (0.5) left nothing for them
("Cluster resources are not enough to run any task from TaskPoolMapOperator[ReadRange]"). They
then asked for 0.25 (`pipeline.data.ray_datasets.plan_index_rows`; now the read runs inside the
decode actors, fused with them, and asks for nothing more), as do the test split's reads
(`read_shards`, whose `ListFiles` task had asked for a whole CPU and stalled a PDDM trial's first
evaluation), and `jobs.sweep` alone ran a Magnet sweep and the 9-trial claims_pddm sweep
(triplet and PDDM) on 2 cores, one trial at a time.

    python benchmarks/claims_sweep.py --num-cpus 8 pipeline/sweeps/claims.yaml --set train.storage_path=runs/claims
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray instance")
    args, rest = parser.parse_known_args(argv)

    import ray

    ray.init(num_cpus=args.num_cpus, log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    from jobs.sweep import main as sweep_main

    return sweep_main(rest)


if __name__ == "__main__":
    sys.exit(main())
