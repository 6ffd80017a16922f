"""ASHA that keeps its rungs across `Tuner.restore`.

Tune restores a sweep's trials but not its scheduler's state: after a resume ASHA would start
with empty rungs and compare the remaining trials only with each other. This scheduler feeds
the results every restored trial saved (its `result.json`) back into its rungs when Tune adds
the trial again.
"""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler


def saved_results(trial) -> list[dict]:
    """The results a trial reported so far, as Tune saved them next to it (oldest first)."""
    storage = trial.storage
    try:
        with storage.storage_filesystem.open_input_stream(f"{trial.path}/result.json") as stream:
            text = stream.read().decode()
    except OSError:  # its results were not synced to storage
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` whose rungs are rebuilt from the saved results of restored trials."""

    def __init__(self, *, time_attr: str, **kwargs):
        super().__init__(time_attr=time_attr, **kwargs)
        self.time_attr = time_attr

    def on_trial_add(self, tune_controller, trial):
        """Register the trial, then replay what it reported before a restore (if anything)."""
        super().on_trial_add(tune_controller, trial)
        if self.time_attr not in trial.last_result:  # a new trial (no folder yet), or no report
            return
        for result in saved_results(trial):
            # The decision is moot: the trial has ended, or restarts from its checkpoint.
            self.on_trial_result(tune_controller, trial, result)
