"""Run a sweep: `python -m jobs.sweep <space.yaml> [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("space", help="sweep file (YAML): losses, their parameters, the search; see README 'Sweeps'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base setting of every trial, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the interrupted sweep of this name (finished trials are kept)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and the trials' output")
    args = parser.parse_args(argv)

    from pipeline.sweep.runner import run_sweep
    from pipeline.sweep.space import SweepError, load_sweep
    from pipeline.training.driver import RunRefused

    try:
        spec = load_sweep(args.space)
        summary = run_sweep(spec, args.overrides, resume=args.resume, verbose=args.verbose)
    except (SweepError, ConfigError, RunRefused) as err:  # all before the sweep's runs exist
        print(f"sweep error: {err}", file=sys.stderr)
        return 2

    from pipeline.tracking import ui_command

    if summary.interrupted:
        print(f"\nsweep {summary.name} interrupted; finished trials are kept. Go on with:\n"
              f"  python -m jobs.sweep {args.space} {' '.join('--set ' + o for o in args.overrides)} --resume")
        return 130
    print(f"\n{len(summary.trials)} trials, best first ({spec.metric}):")
    for trial in summary.trials:
        value = "-" if trial.metric is None else f"{trial.metric:.4f}"
        print(f"  {trial.run_name or trial.trial_id:<28} {value}  {trial.status} ({trial.epochs_done}/{trial.epochs} epochs)")
    if summary.registered_version:
        print(f"best model registered: {spec.registered_model_name} version {summary.registered_version}")
    elif summary.best is not None and summary.logs_models:
        print(f"best model not registered: MLflow did not get run {summary.best.run_id}'s whole "
              f"model/ artifact (its trial's output says why); its checkpoint is in the run's "
              f"folder under train.storage_path")
    print(f"\nMLflow parent run {summary.parent_run_id} in {summary.tracking_uri} (summary/ artifacts)")
    print(f"open the UI: {ui_command(summary.tracking_uri)}")
    print(f"Tune experiment: {summary.experiment_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
