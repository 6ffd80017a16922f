"""What the sweep runner counts as an interrupted sweep, on a real (tiny) Tune experiment: a
Ctrl+C that lands after one trial ended and before Tune created the next leaves every trial
Tune saved as ended, yet the sweep is not done."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline.sweep.runner import _trials_left


@pytest.mark.usefixtures("ray_local")
def test_ctrl_c_between_two_trials_leaves_the_sweep_unfinished_until_resumed(tmp_path):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    def _report(config):  # defined here so that Ray ships it by value to its workers
        tune.report({"score": config["x"]})

    class CtrlCAfterFirstTrial(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            # Tune's own SIGINT handler takes it, as it does a user's Ctrl+C; the callback runs
            # in the loop's thread, before the loop asks the generator for the next trial. Only
            # after the first trial: the resumed run restores this callback too.
            if trial.config["x"] == 1:
                os.kill(os.getpid(), signal.SIGINT)

    tune.Tuner(
        _report,
        param_space={"x": tune.grid_search([1, 2, 3])},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=1, random_state=0)),
        run_config=tune.RunConfig(name="stopped", storage_path=str(tmp_path), callbacks=[CtrlCAfterFirstTrial()],
                                  verbose=0),
    ).fit()
    experiment = str(tmp_path / "stopped")
    saved = tune.ExperimentAnalysis(experiment).trials
    assert [t.status for t in saved] == ["TERMINATED"]  # the case: nothing left running
    assert _trials_left(experiment, None, planned=3) == 2

    tune.Tuner.restore(experiment, trainable=_report, resume_unfinished=True, resume_errored=False).fit()
    assert _trials_left(experiment, None, planned=3) == 0
