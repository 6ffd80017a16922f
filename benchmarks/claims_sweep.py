"""Run the claims sweep (`python -m jobs.sweep`, unchanged) in a local Ray instance with more
logical CPUs than `jobs.sweep` reserves on its own (4 on a 2-core machine).

With 4, a Magnet or PDDM trial of a sweep never trains on the 2-core machine: the trial's
driver (1 CPU), its two workers (1), Ray Data's decode actors (two of 0.5 were started) and
the refresh actor (0.5) leave nothing for Ray Data's read tasks ("Cluster resources are not
enough to run any task from TaskPoolMapOperator[ReadRange]"), and the run hangs before step 1.
Logical CPUs are only a scheduling budget; the cores stay two.

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
