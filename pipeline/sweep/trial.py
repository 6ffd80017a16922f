"""One sweep trial: Tune's driver function, which builds the trial's config and runs one
Ray Train run with it (the Train V2 pattern: the trial is a function, not a Trainer).

The Train run's MLflow run is the trial's child run: it carries the parent's id in
`mlflow.parentRunId`. Each epoch's metrics reach Tune (and so ASHA and the searcher) through
Ray's `TuneReportCallback`: it runs in the Train controller after every `ray.train.report`
and hands rank 0's metrics to this function's Tune session, which reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config, load_config
from pipeline.sweep.space import override, trial_settings

SWEEP_TAG = "sweep.name"
TRIAL_TAG = "sweep.trial_id"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (picklable; Tune stores it with the experiment)."""

    preset: str
    overrides: tuple[str, ...]
    """Base settings: the file's fixed ones, the command line's, and where runs and records go."""
    sweep_name: str
    parent_run_id: str
    preset_settings: dict | None = None
    """The preset's settings as the sweep's driver read them (`read_preset`): a trial runs on
    any node, where a YAML preset's path may not be (None: read `preset` there)."""


def trial_run_name(loss: str, trial_id: str) -> str:
    """The trial's Train run and MLflow run name: stable across a resumed sweep (Tune keeps
    trial ids), so a restarted trial resumes its own checkpoint and MLflow run."""
    return f"{loss}-{trial_id}"


def trial_config(setup: TrialSetup, params: dict, trial_id: str) -> Config:
    """The project config with the trial's sampled settings on top of the base settings."""
    settings = trial_settings(params)
    name = trial_run_name(settings["loss.name"], trial_id)
    overrides = [*setup.overrides, *(override(k, v) for k, v in settings.items()), override("train.run_name", name)]
    return load_config(setup.preset if setup.preset_settings is None else setup.preset_settings, overrides)


def run_trial(params: dict, setup: TrialSetup) -> None:
    """Tune's driver function of one trial: train with the trial's config and relay every
    epoch's report to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.tracking import PARENT_RUN_TAG
    from pipeline.training.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(setup, params, trial_id)
    prefix = f"[{config.train.run_name}]"
    run_training(
        config,
        printer=lambda text, **kw: print(prefix, text, **kw),
        run_tags={PARENT_RUN_TAG: setup.parent_run_id, SWEEP_TAG: setup.sweep_name, TRIAL_TAG: trial_id},
        callbacks=(TuneReportCallback(),),
        in_sweep=True,  # on a cluster Ray starts trials on any node: the sweep checked they fit
    )


def trial_name(trial) -> str:
    """Tune's display name of a trial: its loss and id (as its MLflow run is named)."""
    return trial_run_name(trial_settings(trial.config).get("loss.name", "trial"), trial.trial_id)


def trial_dirname(trial) -> str:
    """The trial's folder in the Tune experiment (short: the default repeats every param)."""
    return f"trial-{trial.trial_id}"
