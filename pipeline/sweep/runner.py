"""Run a sweep: check the file and every config it can produce, open the MLflow parent run,
run (or resume) the Tune experiment, then summarise it on the parent run.

Everything that can be wrong with the file, the configs or the dataset is found before Ray
starts. Results go under `train.storage_path`: the Tune experiment in `<storage>/<name>`, each
trial's Train run (checkpoints) in `<storage>/<name>/train_runs/<loss>-<trial id>`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from pipeline import locks
from pipeline.config import ConfigError, read_preset
from pipeline.storage import absolute_location
from pipeline.sweep import records
from pipeline.sweep.search import (
    build_scheduler,
    build_search,
    check_search_available,
    planned_trials,
)
from pipeline.sweep.space import (
    TRIAL_DRIVER_CPUS,
    SweepError,
    SweepSpec,
    base_overrides,
    candidate_configs,
    override,
    sweep_fingerprint,
    trial_concurrency,
)
from pipeline.sweep.trial import TrialSetup, run_trial, trial_dirname, trial_name

LOCK_DIR = ".sweep-locks"
"""Folder of the sweep locks (`pipeline.locks`), under `train.storage_path`."""

# Settings that say where a trial's records go: the sweep decides them, so they cannot vary.
_PLACES = ("train.storage_path", "train.run_name", "data.cache_dir", "data.root", "model.pretrained")


@dataclass
class SweepSummary:
    """Where a sweep's results are, and how it ended."""

    name: str
    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    interrupted: bool
    trials: list = field(default_factory=list)
    """`records.TrialRecord`s, best first (empty when interrupted)."""
    best: object = None
    registered_version: str | None = None
    logs_models: bool = True
    """`tracking.log_model`: whether trials log the `model/` a sweep registers."""


def _experiment_storage(storage: str):
    """(storage_path, storage_filesystem) for Tune: s3:// gets the project's S3 filesystem
    (endpoint, retries) and the path without its scheme."""
    if not storage.startswith("s3://"):
        return storage, None
    from pipeline.storage import filesystem_for

    filesystem, path = filesystem_for(storage)
    return path, filesystem


def _trials_left(experiment: str, filesystem, planned: int) -> int:
    """Trials of the `planned` that had not ended when Tune last saved the experiment: those
    still running (Tune saves before it stops the trials of an interrupted run, whose results
    then look ended) and those not yet created (a Ctrl+C between two trials)."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment, storage_filesystem=filesystem).trials
    ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
    return max(planned - ended, 0)


def run_sweep(spec: SweepSpec, cli_overrides: list[str], *, resume: bool = False,
              verbose: bool = False, printer=print) -> SweepSummary:
    """Run the sweep `spec` (or, with `resume`, go on with the one stored under its name).

    The storage settings (S3 endpoint, retries) are in this process's environment only while
    it runs, so a caller in the same process does not inherit them afterwards."""
    from pipeline import storage as storage_settings
    from pipeline.config.loading import load_config

    check_search_available(spec)
    overrides = base_overrides(spec, cli_overrides)
    for key in [*spec.space, *(k for dims in spec.losses.values() for k in dims)]:
        if key in _PLACES or key.startswith(("tracking.", "storage.")):
            raise SweepError(f"{spec.path}: {key}: where records go, and how they are reached, "
                             "cannot vary between trials; set it with --set or in fixed")
    # Every trial's storage section: the preset's, with the storage settings given (they cannot
    # vary). Exported before the trial configs are checked, which read an s3:// data.root.
    try:
        stored = load_config(spec.preset, [o for o in overrides if o.strip().startswith("storage.")])
    except ConfigError as err:  # a bad endpoint or retry budget, named
        raise SweepError(f"{spec.path}: {err}") from err
    with storage_settings.exported_settings(stored):
        return _run_sweep(spec, overrides, resume=resume, verbose=verbose, printer=printer)


def _run_sweep(spec: SweepSpec, overrides: list[str], *, resume: bool, verbose: bool,
               printer) -> SweepSummary:
    from ray import tune

    from pipeline import tracking
    from pipeline.cluster_reach import run_needs
    from pipeline.training.driver import PreflightCache, preflight
    from pipeline.training.resources import local_resources, uses_local_ray

    candidates = candidate_configs(spec, overrides)
    configs = [c for per_loss in candidates.values() for c in per_loss]
    base = configs[0]
    storage = base.train.storage_path
    storage = absolute_location(storage)
    experiment_path = f"{storage}/{spec.name}"
    tune_storage, tune_filesystem = _experiment_storage(storage)
    uri = tracking.tracking_uri(base)
    tune_experiment = f"{tune_storage}/{spec.name}"

    def check_name() -> None:
        try:
            exists = tune.Tuner.can_restore(tune_experiment, tune_filesystem)
        except OSError as err:  # an unreachable store: pyarrow's message names it
            raise SweepError(f"train.storage_path: {err}") from err
        if resume and not exists:
            raise SweepError(f"--resume: there is no sweep to resume at {experiment_path}")
        if exists and not resume:
            raise SweepError(f"a sweep named {spec.name!r} already ran at {experiment_path}: pass "
                             "--resume to go on with it, or give the sweep another name")

    check_name()
    cache = PreflightCache()
    have = local_resources() if uses_local_ray() else None
    # Every dataset a trial can train on is valid and fits its sampler.
    roots = [preflight(config, cache, have=have)[0] for config in configs]
    if have is not None:  # a trial (with its driver function) fits a local Ray, or stop here
        trial_concurrency(configs, have, spec.max_concurrent_trials)
    try:
        tracking.check_store(uri, tracking.tracking_setting(base))
    except ValueError as err:
        raise SweepError(str(err)) from err
    # The sweep's lock while this driver runs it, taken after the checks that write nothing: a
    # sweep of this name started meanwhile is running (refused) or has written its experiment
    # (the name is checked again under the lock).
    lock_location = f"{storage}/{LOCK_DIR}"
    held = contextlib.ExitStack()
    try:
        held.enter_context(locks.exclusive(lock_location, spec.name, lambda holder: (
            f"a sweep named {spec.name!r} is being run by {holder}; wait for it to end (or stop "
            "it), or give the sweep another name"
        )))
    except ValueError as err:
        raise SweepError(str(err)) from err
    with held:
        check_name()
        lock_file = locks.lock_file(lock_location, spec.name)  # (a node that sees it shares the storage)
        reach = {need for config, root in zip(configs, roots, strict=True)
                 for need in run_needs(config, root, lock_file)}
        return _run_held(spec, overrides, configs, experiment_path, tune_experiment, tune_storage,
                         tune_filesystem, resume=resume, verbose=verbose, printer=printer,
                         reach=sorted(reach, key=lambda need: (need.setting, need.target)))


def _run_held(spec: SweepSpec, overrides: list[str], configs, experiment_path: str,
              tune_experiment: str, tune_storage: str, tune_filesystem, *, resume: bool,
              verbose: bool, printer, reach: list) -> SweepSummary:
    """The sweep, its checks passed and its lock held: the parent run, the Tune experiment, the
    summary. `reach`: what its trials open on every node (`cluster_reach.run_needs`)."""
    from mlflow import MlflowClient
    from ray import tune

    from pipeline import tracking
    from pipeline.cluster_reach import check_cluster_reach
    from pipeline.sweep.progress import SweepProgress
    from pipeline.training.driver import _init_ray
    from pipeline.training.resources import uses_local_ray

    base = configs[0]
    uri = tracking.tracking_uri(base)
    located = [
        override("train.storage_path", f"{experiment_path}/train_runs"),
        override("tracking.tracking_uri", uri),
        override("data.cache_dir", absolute_location(base.data.cache_dir)),
    ]
    for key, value in (("data.root", base.data.root), ("model.pretrained", base.model.pretrained)):
        if value:  # trials run in their own working directory
            located.append(override(key, absolute_location(value)))

    import ray

    # Before the parent run is opened: a preset that no longer reads, a cluster that cannot hold
    # a trial, or whose other nodes lack the trials' files or servers, leaves no run behind.
    try:
        preset_settings = read_preset(spec.preset)
    except ConfigError as err:
        raise SweepError(f"{spec.path}: preset: {err}") from err
    _init_ray(verbose)
    try:
        check_cluster_reach(reach, printer)
    except ValueError as err:
        raise SweepError(str(err)) from err
    concurrency = trial_concurrency(configs, ray.cluster_resources(), spec.max_concurrent_trials,
                                    nodes_may_come=not uses_local_ray(), printer=printer)
    client = MlflowClient(uri)
    parent_run_id = records.open_parent_run(
        client, base, spec, overrides, experiment_path, sweep_fingerprint(spec, overrides), resume
    )
    setup = TrialSetup(spec.preset, tuple(overrides + located), spec.name, parent_run_id,
                       preset_settings=preset_settings)
    printer(
        f"sweep {spec.name}: {spec.search} search over {', '.join(spec.losses)}, "
        f"{concurrency} trial(s) at a time; Tune experiment {experiment_path}; "
        f"MLflow parent run {parent_run_id} in {uri}",
        flush=True,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_DRIVER_CPUS})
    if resume:
        tuner = tune.Tuner.restore(
            tune_experiment, trainable=trainable, resume_unfinished=True,
            resume_errored=False, storage_filesystem=tune_filesystem,
        )
    else:
        param_space, search_alg = build_search(spec, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=search_alg,
                scheduler=build_scheduler(spec, min(c.train.epochs for c in configs)),
                num_samples=spec.num_samples,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=tune_storage,
                storage_filesystem=tune_filesystem,
                callbacks=[SweepProgress(spec.metric)],
                # A trial whose driver died (its node lost) is retried; the retry's run_training
                # finds the trial's Train run by name and resumes from its last checkpoint.
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                verbose=0,
            ),
        )
    results = tuner.fit()
    summary = SweepSummary(spec.name, experiment_path, uri, parent_run_id, interrupted=False)
    if _trials_left(tune_experiment, tune_filesystem, planned_trials(spec)):
        # Stopped (Ctrl+C) before every trial ended: Tune saved the experiment, and a resume
        # runs only the trials that had not ended, then those not yet created.
        client.set_terminated(parent_run_id, status="KILLED")
        summary.interrupted = True
        return summary

    trials = records.trial_records(results, setup, spec)
    experiment_id = tracking.experiment_id(client, base)
    records.link_child_runs(client, experiment_id, parent_run_id, trials)
    best = records.best_trial(trials, spec.mode)
    registered = None
    summary.logs_models = base.tracking.log_model
    if best is not None and summary.logs_models:
        registered = records.register_best(client, best, spec.registered_model_name)
    records.finish_parent(client, parent_run_id, spec, trials, best, registered)
    summary.trials = records.sorted_records(trials, spec.mode)
    summary.best = best
    summary.registered_version = registered
    return summary
