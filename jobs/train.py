"""Train one model: `python -m jobs.train [--preset local] [--set key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, available_presets, describe, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="local", help=f"preset name ({', '.join(available_presets())}) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set loss.triplet.margin=0.1 (repeatable)")
    parser.add_argument("--help-config", action="store_true", help="list every setting with its default and exit")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        config = load_config(args.preset, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from ray.train import TrainingFailedError

    from pipeline.tracking import ui_command
    from pipeline.training.driver import RunInterrupted, RunRefused, resume_hint, run_training

    try:
        summary = run_training(config, verbose=args.verbose)
    except RunRefused as err:  # before the run exists: the message names the setting or file
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunInterrupted, KeyboardInterrupt) as err:
        print(f"\ninterrupted: {resume_hint(config, getattr(err, 'settled', True))}", file=sys.stderr)
        return 130
    except TrainingFailedError as err:  # Ray has printed the workers' errors above
        print(f"\ntraining failed ({type(err).__name__}); {resume_hint(config)}", file=sys.stderr)
        return 1
    print("\ntest metrics (unseen classes):")
    for key, value in summary.metrics.items():
        if key.startswith("test/") and not key.startswith(("test/num_", "test/eval_")):
            print(f"  {key.removeprefix('test/'):<16} {value:.4f}")
    print(f"\nMLflow run {summary.run_id} ({summary.run_name}) in {summary.tracking_uri}")
    print(f"open the UI: {ui_command(summary.tracking_uri)}")
    print(f"checkpoint: {summary.checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
