"""The sweep driver's output: one line per trial epoch and per trial end (Tune's own status
tables are turned off)."""

from __future__ import annotations

from ray import tune


class SweepProgress(tune.Callback):
    """Prints each trial's epochs (with the sweep metric) and how it ended."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """A trial reported an epoch."""
        value = result.get(self.metric)
        shown = "-" if value is None else f"{value:.4f}"
        print(f"trial {trial}: epoch {result.get('epoch')}  {self.metric} {shown}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        """A trial ended: all its epochs, or stopped early by ASHA."""
        print(f"trial {trial}: ended after epoch {trial.last_result.get('epoch')}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A trial's attempt failed (its driver died, e.g. its node was lost) and Tune retries
        it; the retry resumes the trial's Train run from its last checkpoint."""
        print(f"trial {trial}: attempt {trial.num_failures} failed, retrying "
              f"from its last checkpoint", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        """A trial failed."""
        print(f"trial {trial}: failed (its log: {trial.path})", flush=True)
