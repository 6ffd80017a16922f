"""Seconds from `run_training` to the first logged step, and to its return, for short runs.

    python benchmarks/run_startup.py --repeats 3
    python benchmarks/run_startup.py --short magnet --repeats 3

Each repeat is a whole run on one Ray instance started here: the tests' short run (`local`
shrunk to 8 steps on the built-in 24-class set, what most tests run) or their short Magnet run
(the `magnet` preset, 2 epochs of 4 steps; its first sub-batches wait for the refresh actor's
first index). What a short run costs is mostly start-up: the Train controller, the workers, Ray
Data's split coordinator and decode actors, each a process importing what it unpickles. Prints
one JSON line per run and a summary line (medians).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from short_runs import SHORT_MAGNET, SHORT_RUN, TINY_BUILT_IN  # noqa: E402 - the tests' own definition

SHORT = {
    "run": ("local", TINY_BUILT_IN + SHORT_RUN),
    "magnet": ("magnet", SHORT_MAGNET + ["train.epochs=2", "train.steps_per_epoch=4"]),
}
"""The tests' short runs (preset, settings): 2 workers, 2 epochs of 4 steps."""


def one_run(preset: str, settings: list[str], root: Path, name: str) -> dict:
    """Train once; seconds to the first logged step, the first evaluation's own seconds, and
    seconds to the end."""
    from pipeline.config import load_config
    from pipeline.training.driver import run_training

    config = load_config(preset, settings + [f"data.cache_dir={root / 'data'}",
                                             f"train.storage_path={root / name}"])
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def printer(text: str, **_) -> None:
        if " step " in text and "first_step_s" not in marks:
            marks["first_step_s"] = time.perf_counter() - start
        if " eval " in text and "first_eval_s" not in marks:  # "... (5.2s)": its own duration
            marks["first_eval_s"] = float(text.rsplit("(", 1)[1].rstrip("s)"))

    run_training(config, printer=printer)
    return {"first_step_s": round(marks["first_step_s"], 2), "first_eval_s": marks["first_eval_s"],
            "total_s": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run the repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", choices=sorted(SHORT), default="run", help="which of the tests' short runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for ray.init (the tests use 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override on top of the short run (repeatable)")
    args = parser.parse_args(argv)

    import ray

    preset, settings = SHORT[args.short]
    ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            result = one_run(preset, settings + args.set, Path(tmp), f"run{i}")
            runs.append(result)
            print(json.dumps({"run": i, **result}), flush=True)
    ray.shutdown()
    print(json.dumps({"summary": {
        "short": args.short, "preset": preset, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        **{f"median_{k}": statistics.median(r[k] for r in runs) for k in ("first_step_s", "first_eval_s", "total_s")},
    }}), flush=True)


if __name__ == "__main__":
    main()
