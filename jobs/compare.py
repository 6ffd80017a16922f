"""Compare runs: `python -m jobs.compare --experiment dml [--tracking-uri URI] [--top 10]
[--metric test/recall_at_1]` prints an experiment's best runs as a table."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the local store a default training run writes."""
    from pipeline.config import Config
    from pipeline.tracking import tracking_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(Config())


def main(argv: list[str] | None = None) -> int:
    from pipeline.reporting.comparison import DEFAULT_METRIC, best_runs, format_table

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="dml", help="MLflow experiment name (default: dml)")
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
        "else the local store runs/mlflow.db)",
    )
    parser.add_argument("--top", type=int, default=10, help="how many runs to show (default: 10)")
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help=f"rank runs by this metric, highest first "
        f"(default: {DEFAULT_METRIC}; test/recall@4 works too)",
    )
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    # MlflowClient would create an empty sqlite store where there is none (and retry for
    # minutes on a folder): say so instead.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: train a run first, or give "
            "--tracking-uri",
            file=sys.stderr,
        )
        return 2

    from mlflow import MlflowClient

    from pipeline.tracking import check_store

    try:
        check_store(uri, "--tracking-uri")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        rows = best_runs(MlflowClient(uri), args.experiment, args.metric, args.top)
    except ValueError as err:
        print(f"{uri}: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"experiment {args.experiment!r} in {uri} has no runs yet")
        return 0
    print(f"best {len(rows)} runs of experiment {args.experiment!r} by {args.metric} ({uri})\n")
    print(format_table(rows, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
