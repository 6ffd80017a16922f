"""What `ray job stop` leaves of a training job, on a real two-node cluster of `ray start`
processes (the job-submit test's `LocalRayCluster`: token auth, its own ports and temp dirs).

    python benchmarks/job_stop.py                 # Ray's default stop: SIGTERM, SIGKILL after 3 s
    python benchmarks/job_stop.py --signal SIGINT --wait 30   # RAY_JOB_STOP_SIGNAL / _WAIT_TIME_S

Submits the tests' tiny training job (30 epochs of 4 steps), waits for its first registered
checkpoint and 2 s more, stops it, and prints one JSON line: how long `ray job stop` took, the
job's status, the step the driver's resume hint named (and whether it said a later one may be
registered), the step Ray Train's record holds afterwards (a rerun resumes from that one), and
the MLflow run's status.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_job_submit import TINY, LocalRayCluster  # noqa: E402 - the test's own cluster and job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", choices=["SIGTERM", "SIGINT"], default=None,
                        help="RAY_JOB_STOP_SIGNAL on the cluster (default: Ray's, SIGTERM)")
    parser.add_argument("--wait", type=int, default=None,
                        help="RAY_JOB_STOP_WAIT_TIME_S on the cluster (default: Ray's, 3)")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.training.checkpoint import registered_checkpoint
    from pipeline.training.driver import run_name_for

    root = Path(tempfile.mkdtemp(prefix="dmlstop-", dir="/tmp"))  # short: Ray's socket paths
    cluster = LocalRayCluster(root)
    if args.signal:
        cluster.env["RAY_JOB_STOP_SIGNAL"] = args.signal
    if args.wait is not None:
        cluster.env["RAY_JOB_STOP_WAIT_TIME_S"] = str(args.wait)
    storage = root / "runs"
    overrides = [o for o in TINY if not o.startswith("train.epochs")] + [
        "train.epochs=30", f"data.cache_dir={root / 'data'}", f"train.storage_path={storage}"]
    name = run_name_for(load_config("local", overrides))
    try:
        cluster.start()
        submitted = cluster.cli("submit", "--no-wait", "--submission-id", "stop-me", "--working-dir", ".",
                                "--", "python", "-m", "jobs.train", "--preset", "local",
                                *[arg for item in overrides for arg in ("--set", item)])
        if submitted.returncode != 0:
            raise SystemExit(submitted.stdout + submitted.stderr)
        deadline = time.monotonic() + 600
        while registered_checkpoint(str(storage), name) is None:
            if time.monotonic() > deadline or cluster.job_status("stop-me") in ("FAILED", "STOPPED", "SUCCEEDED"):
                raise SystemExit(cluster.job_logs("stop-me")[-3000:])
            time.sleep(0.5)
        time.sleep(2)
        start = time.monotonic()
        stopped = cluster.cli("stop", "stop-me")
        seconds = time.monotonic() - start
        time.sleep(5)  # the job's actors go with its driver
        logs = cluster.job_logs("stop-me")
        hint = re.findall(r"interrupted: .* at step (\d+)", logs)
        found = registered_checkpoint(str(storage), name)
        print(json.dumps({
            "signal": args.signal or "SIGTERM (Ray's default)", "wait_s": 3 if args.wait is None else args.wait,
            "stop_rc": stopped.returncode, "stop_seconds": round(seconds, 1),
            "job_status": cluster.job_status("stop-me"),
            "hint_step": int(hint[-1]) if hint else None,
            # The driver says when Ray Train may still register a later one (SIGTERM).
            "hint_allows_later": "or from a later one" in logs,
            "registered_step": None if found is None else found[2],
            "mlflow_status": [row[0] for row in sqlite3.connect(storage / "mlflow.db").execute("select status from runs")],
            "sigterm_trace_in_log": "SIGTERM received" in logs,
        }))
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
