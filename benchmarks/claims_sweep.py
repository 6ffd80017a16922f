"""Run the claims sweep (`python -m jobs.sweep`, unchanged) in a local Ray instance with more
logical CPUs than `jobs.sweep` reserves on its own (4 on a 2-core machine), as the recorded run
in benchmarks/README.md did.

When that run was made, a Magnet or PDDM trial never trained with 4: the trial's driver
(1 CPU), its two workers (1), one decode actor per rank (2 x 0.5) and the refresh actor (0.5)
left nothing for the plan stream's read tasks, which asked for a whole CPU each ("Cluster
resources are not enough to run any task from TaskPoolMapOperator[ReadRange]"). The sweep now
counts the per-rank decode actors and one Ray Data task in a trial's needs, but the read tasks
still ask for a whole CPU (`ray.data.range`), so on a 2-core machine use this (8 logical CPUs,
which also lets two trials share the 2 cores). Asking for less made a Magnet run stall, most
likely from the per-rank streams' delivery out of plan order (fixed in 9a06fdd); asking for less
has not been retried since.

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
