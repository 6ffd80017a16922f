"""The local MLflow store under jobs that start together: a new sqlite store and a new
experiment, opened by several processes at the same moment (a shell loop of background runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

JOBS = 4
OPEN_AND_CREATE = f"""
import os, sys, time
from mlflow import MlflowClient
from pipeline import tracking
from pipeline.config import load_config

config = load_config("local", [f"train.storage_path={{sys.argv[1]}}", "tracking.experiment=together"])
uri = tracking.tracking_uri(config)
# A barrier: every process has imported everything, then all open the store at once.
open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
while len(os.listdir(sys.argv[2])) < {JOBS}:
    time.sleep(0.01)
tracking.check_store(uri)
print(tracking.experiment_id(MlflowClient(uri), config))
"""


def test_jobs_that_open_a_new_store_and_experiment_together_all_start(tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    processes = [
        subprocess.Popen([sys.executable, "-c", OPEN_AND_CREATE, str(tmp_path / "runs"), str(ready)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(JOBS)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    assert all(rc == 0 for rc, _, _ in results), [err[-1500:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment, found by all
