"""Evaluate a checkpoint: `python -m jobs.evaluate <checkpoint dir or run name> [--set k=v ...]`.

The checkpoint's config says what to evaluate on; `--set data.root=s3://bucket/cars196` points
it at another dataset, `--set eval.recall_ks=[1,10,100,1000]` changes the metrics. Runs
locally or under `ray job submit` (RAY_ADDRESS), like the training job.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError
from pipeline.serving import add_device_flag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory, a run directory, or a run name "
        "under train.storage_path (its latest checkpoint); local or s3://",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the checkpoint's config (repeatable)",
    )
    parser.add_argument(
        "--gallery-split",
        default=None,
        help="rank data.test_split's images against this split (In-Shop: query vs gallery)",
    )
    add_device_flag(parser)
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and progress bars"
    )
    args = parser.parse_args(argv)

    from pipeline.serving.evaluation import evaluate_checkpoint
    from pipeline.storage import check_location
    from pipeline.tracking import ui_command

    try:
        check_location(args.checkpoint, "checkpoint")  # a mistyped URI would be a local folder
        summary = evaluate_checkpoint(
            args.checkpoint, args.overrides, gallery_split=args.gallery_split, device=args.device,
            verbose=args.verbose,
        )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a missing checkpoint, split or dataset file: named in the message
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    for key, value in summary.metrics.items():
        if "/num_" not in key:
            print(f"  {key:<24} {value:.4f}")
    print(f"\nMLflow run {summary.run_id} ({summary.run_name}) in {summary.tracking_uri}")
    print(f"open the UI: {ui_command(summary.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
