"""The driver of one training run: check everything, start Ray, fit, record, summarise.

Everything that can be wrong with the config or the dataset is found before Ray starts and
before any cluster resource is taken.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import sys
import threading
from dataclasses import dataclass, field

from pipeline import locks
from pipeline.cluster_reach import check_cluster_reach, run_needs
from pipeline.config import Config, config_digest, config_to_dict, config_to_yaml
from pipeline.data.format import (
    DatasetMetadata,
    read_metadata,
    read_split,
    shard_uris,
    validate_dataset,
)
from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic
from pipeline.evaluation.protocol import gallery_split, resolve_evaluation
from pipeline.storage import absolute_location
from pipeline.training.checkpoint import (
    CheckpointRecordUnreadable,
    load_metrics,
    registered_checkpoint,
    unregistered_checkpoints,
)
from pipeline.training.resources import check_fits_locally, local_resources, uses_local_ray
from pipeline.training.resume import (
    check_recorded_run,
    check_resume,
    check_schedule,
    resume_changes,
)
from pipeline.training.run_lock import run_lock, run_lock_file
from pipeline.training.worker_entry import RunPlan, train_loop_per_worker


@dataclass
class RunSummary:
    """What a finished run reports back to its caller."""

    run_name: str
    run_id: str
    tracking_uri: str
    metrics: dict
    checkpoint_path: str | None
    not_logged: tuple[str, ...] = ()
    """What the tracking server did not get (metrics, artifacts, run status); empty = all."""


def run_name_for(config: Config) -> str:
    """A stable run name (no timestamps): rerunning the same config resumes the same run."""
    return config.train.run_name or f"{config.loss.name}-{config.model.backbone}-{config_digest(config)}"


def resolve_dataset(config: Config) -> tuple[str, DatasetMetadata]:
    """The dataset root to train on (generating the built-in one if needed) and its metadata;
    raises ValueError naming the setting if a split the run would use is not there."""
    if config.data.root:
        metadata = read_metadata(config.data.root)
        root = config.data.root
    else:
        root = ensure_synthetic(config.data.cache_dir, SyntheticSpec(**vars(config.data.synthetic)))
        metadata = read_metadata(root)
    resolved = resolve_evaluation(config, metadata)  # check the split actually evaluated
    splits = {"data.train_split": config.data.train_split, "data.test_split": resolved.data.test_split}
    for where, split in splits.items():
        if split not in metadata.splits:
            left = where == "data.test_split" and not config.data.test_split
            raise ValueError(
                f"{where}: {root} has no split {split!r} (it has {', '.join(metadata.splits)})"
                + ("; it was left empty and the dataset names no query split" if left else "")
            )
    validate_dataset(root)
    return root, metadata


class RunInterrupted(Exception):
    """Training was stopped from outside (Ctrl+C, `ray job stop`) once its MLflow run existed:
    the run is recorded as KILLED in MLflow, and a rerun of the same command resumes it.

    `settled` is False when the stop left Ray Train's controller running (SIGTERM, `ray job
    stop`'s default, during fit()): it may register more checkpoints before this driver's exit
    ends it, so the one a rerun resumes from is not known yet. Ctrl+C (SIGINT) aborts the
    controller first.
    """

    def __init__(self, message: str, settled: bool = True):
        super().__init__(message)
        self.settled = settled

    def __reduce__(self):  # pickled whole (a Tune trial's error travels to the driver)
        return type(self), (str(self), self.settled)


class RunRefused(ValueError):
    """A run refused before Ray started and before the run was created (no MLflow run, no
    checkpoint folder): the message names the setting, or the dataset file, that is wrong."""


@dataclass
class PreflightCache:
    """What `preflight` has read, kept by a caller that checks many configs (a sweep), so
    each dataset and each pretrained file is read once."""

    datasets: list = field(default_factory=list)
    """(DataConfig, (root, metadata, class-index labels of the training split))."""
    weights: set = field(default_factory=set)
    """(backbone, model.pretrained) pairs that loaded and fitted."""


def preflight(config: Config, cache: PreflightCache | None = None, *,
              have: dict[str, float] | None = None) -> tuple[str, DatasetMetadata]:
    """Everything a run needs that can be checked without Ray, past its config (`load_config`)
    and storage settings (`storage.export_settings`): the dataset and its splits, the sampler
    against the training split, the pretrained weights' file, and, given the CPUs and GPUs a
    local Ray will `have`, that the run fits in them. Returns `resolve_dataset`'s (root,
    metadata); raises RunRefused.

    `cache` (kept by a caller checking many configs: a sweep) remembers the datasets already
    read and the pretrained weights already loaded."""
    import numpy as np

    from pipeline import storage
    from pipeline.data.ray_datasets import check_training_split
    from pipeline.models import build_model

    cache = PreflightCache() if cache is None else cache
    try:
        if have is not None:
            check_fits_locally(config, have)
        known = [found for data, found in cache.datasets if data == config.data]
        if known:
            root, metadata, labels = known[0]
        else:
            try:
                root, metadata = resolve_dataset(config)
                raw = read_split(root, config.data.train_split, ["label"]).column("label").to_numpy()
            except OSError as err:  # an unreachable store or an unreadable file: pyarrow names it
                # Without data.root the built-in dataset is generated under data.cache_dir.
                raise ValueError(f"{'data.root' if config.data.root else 'data.cache_dir'}: {err}") from err
            # Remapped to 0..C-1 in class order, as the training stream's store does.
            labels = np.unique(raw, return_inverse=True)[1]
            cache.datasets.append((config.data, (root, metadata, labels)))
        check_training_split(config, labels)
        weights = (config.model.backbone, config.model.pretrained)
        if config.model.pretrained and weights not in cache.weights:
            try:
                storage.check_file_exists(config.model.pretrained, "model.pretrained")
                # Loaded and fitted to the backbone as each worker will: wrong weights are
                # found here, not in every worker after Ray started and the run was created.
                build_model(config.model)
            except OSError as err:
                raise ValueError(f"model.pretrained: {err}") from err
            cache.weights.add(weights)
    except ValueError as err:
        raise RunRefused(str(err)) from err
    return root, metadata


def _eval_split_dataset(config: Config, root: str, split: str):
    """A split read and decoded for evaluation, the way `build_training_data` builds 'test'."""
    from pipeline.data.decoding import decode_eval_batch
    from pipeline.data.ray_datasets import EVAL_DECODE_CPUS, read_shards

    return read_shards(shard_uris(root, split)).select_columns(["id", "label", "image"]).map_batches(
        decode_eval_batch,
        fn_kwargs={"image_size": config.data.image_size, "resize": config.data.eval_resize},
        batch_size=128,
        num_cpus=EVAL_DECODE_CPUS,
    )


def _storage_path(config: Config) -> str:
    return absolute_location(config.train.storage_path)


def _train_storage(config: Config) -> tuple[str, object]:
    """Ray Train's (storage_path, storage_filesystem): s3:// storage gets a filesystem with the
    configured endpoint and retries (Ray Train then wants the path without its scheme)."""
    storage = _storage_path(config)
    if not storage.startswith("s3://"):
        return storage, None
    from pipeline.storage import filesystem_for

    filesystem, path = filesystem_for(storage)
    return path, filesystem


def checkpoint_uri(storage_path: str, checkpoint_path: str) -> str:
    """Where a checkpoint Ray Train reports is, for a user: Ray gives a path inside the
    storage's filesystem (`bucket/runs/x/checkpoint_...` for s3:// or gs:// storage), which
    alone reads as a local path; it gets the storage's scheme back."""
    if "://" not in storage_path:
        return checkpoint_path
    return f"{storage_path.split('://', 1)[0]}://{checkpoint_path}"


def _init_ray(verbose: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    # A local run reserves more logical CPUs than cores so Data and Train never starve each
    # other on a small machine; on a cluster (RAY_ADDRESS set) the cluster's resources rule.
    ray.init(
        num_cpus=int(local_resources()["CPU"]) if uses_local_ray() else None,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        configure_logging=True,
    )


def _record_conversion_summary(uri: str, run_id: str, root: str, printer) -> None:
    """Put the dataset's conversion summary (what the converter skipped, and why) in the run:
    the file as an artifact and the skipped count as a tag, so a run on damaged data says so."""
    from mlflow import MlflowClient

    from pipeline.data.convert.writer import SUMMARY_FILE, read_summary

    client = MlflowClient(uri)
    try:
        summary = read_summary(root)
    except ValueError as err:  # a conversion stopped while writing it: the dataset itself is whole
        client.set_tag(run_id, "dataset.skipped_images", "unknown")
        printer(f"dataset: its {SUMMARY_FILE} does not read ({err}); what the conversion skipped "
                f"is not recorded", flush=True)
        return
    if summary is None:
        return
    skipped = summary.get("skipped", {}).get("count", 0)
    client.set_tag(run_id, "dataset.skipped_images", str(skipped))
    client.log_dict(run_id, summary, f"dataset/{SUMMARY_FILE}")
    if skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["skipped"].get("by_reason", {}).items())
        printer(f"dataset: {skipped} images were skipped at conversion ({reasons}); "
                f"see dataset/{SUMMARY_FILE} in the MLflow run", flush=True)


def run_training(config: Config, *, verbose: bool = False, printer=print,
                 run_tags: dict[str, str] | None = None, callbacks: tuple = (),
                 in_sweep: bool = False) -> RunSummary:
    """Train, evaluate and record one run as the config says; returns where the results are.

    `run_tags` are added to the MLflow run's tags (a sweep trial's parent run); `callbacks` are
    Ray Train callbacks (a sweep trial's `TuneReportCallback`, which hands each epoch to Tune).
    `in_sweep`: a sweep trial runs on the sweep's Ray, whatever node its driver function is on,
    and the sweep has checked that its trials fit: this machine's CPUs and GPUs are not checked.
    """
    from pipeline import storage, tracking

    # The S3 endpoint and retries, for this process and (worker_env) the Ray workers; a bad
    # setting or a URI carrying credentials stops here, before anything is written.
    try:
        worker_env = storage.export_settings(config)
    except ValueError as err:
        raise RunRefused(str(err)) from err
    if not verbose:
        import mlflow  # noqa: F401  (its import sets its own log level; lower it afterwards)

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    local = uses_local_ray() and not in_sweep
    root, metadata = preflight(config, have=local_resources() if local else None)
    # Named from the config as given, so the name follows from the config alone (jobs and
    # tests that resume or watch a run compute it without reading the dataset).
    name = run_name_for(config)
    # From here on every consumer (workers, MLflow params, checkpoints, report) sees the
    # split and cut-offs actually evaluated, never the empty "from the dataset".
    config = resolve_evaluation(config, metadata)
    gallery = gallery_split(config, metadata)
    uri = tracking.tracking_uri(config)
    try:
        # A rerun of the same run name resumes (Ray Train picks up its latest checkpoint): the
        # data plan and the refresh actor start where that checkpoint left off, and only a
        # checkpoint trained with the same settings is resumed.
        resume_from = registered_checkpoint(_storage_path(config), name)
        saved = None if resume_from is None else check_resume(config, name, resume_from, metadata.fingerprint)
        tracking.check_store(uri, tracking.tracking_setting(config))  # (creates a local store: after the refusals that need none)
        recorded = tracking.recorded_run(config, name)
        if recorded is not None and saved is None:  # stopped before its first checkpoint
            check_recorded_run(config, name, recorded, metadata.fingerprint)
        if recorded is not None and saved is not None:
            check_schedule(config, name, saved, resume_from[2], recorded.last_step)
    except ValueError as err:
        raise RunRefused(str(err)) from err
    # The run's lock, for as long as this driver trains it; taken after the checks that write
    # nothing (it makes a folder in the storage). Tune runs one attempt of a trial at a time.
    held = contextlib.ExitStack()
    try:
        if not in_sweep:
            try:
                held.enter_context(run_lock(_storage_path(config), name))
                # A job of this run that ended between the checks above and the lock moved the
                # run on: what was checked (and where a resume starts) is stale.
                now = registered_checkpoint(_storage_path(config), name)
                if (now and now[1:]) != (resume_from and resume_from[1:]):  # (directory, step)
                    raise ValueError(f"train.run_name: run {name!r} was trained by another job while "
                                     "this one started; run the command again")
                if not uses_local_ray():  # other nodes see the same files and servers (after the lock: its file is one)
                    _init_ray(verbose)
                    check_cluster_reach(run_needs(config, root, run_lock_file(_storage_path(config), name)), printer)
            except ValueError as err:
                raise RunRefused(str(err)) from err
            if resume_from is not None and locks.keeps_apart(_storage_path(config)):
                _remove_unregistered_checkpoints(_storage_path(config), name, printer)
        config_yaml = config_to_yaml(config)
        # A resume that changes settings (more epochs, another data.root) says so on the run:
        # its params are the first attempt's, and MLflow params cannot change.
        changes = "" if saved is None else resume_changes(saved, config)
        run_id = tracking.start_run(
            config,
            name,
            config_yaml,
            tags={
                "git_commit": tracking.git_commit(),
                "dataset.name": metadata.name,
                "dataset.fingerprint": metadata.fingerprint,
                "dataset.root": root,
                **({f"pipeline.resumed_at_step_{resume_from[2]}": changes} if changes else {}),
                **(run_tags or {}),
            },
        )
    except BaseException:
        held.close()
        raise
    from pipeline.reporting.run_report import record_finished_run

    # From here on a run exists in MLflow: whatever stops it is recorded there as FAILED (or
    # KILLED, when it was stopped from outside).
    failed = True
    interrupted = False
    checkpoint_path = None
    metrics: dict = {}
    not_logged: list[str] = []
    refresh_actor = None
    try:
        printer(f"run {name}: dataset {metadata.name} ({root}), MLflow run {run_id}", flush=True)
        _record_conversion_summary(uri, run_id, root, printer)

        import ray.data
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        _init_ray(verbose)
        if not verbose:  # Data's per-execution INFO lines would interleave with the progress lines
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        data_context = ray.data.DataContext.get_current()
        data_context.enable_progress_bars = verbose
        data_context.print_on_execution_start = verbose

        from pipeline.data.ray_datasets import build_training_data
        from pipeline.refresh.actor import refresh_actor_name

        actor_name = refresh_actor_name(name) if config.uses_refresh_actor else ""
        start_step = 0 if resume_from is None else resume_from[2]
        data = build_training_data(config, root, actor_name, start_step=start_step)
        queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        plan = RunPlan(
            run_id=run_id,
            run_name=name,
            tracking_uri=uri,
            num_classes=data.num_train_classes,
            steps_per_epoch=data.steps_per_epoch,
            total_steps=data.total_steps,
            progress_queue=queue,
            refresh_actor=actor_name,
            refresh_every_steps=config.refresh.every_steps or data.steps_per_epoch,
            seen_holdout_ids=data.holdout_ids if len(data.holdout_ids) else None,
            stream_start_step=data.start_step,
            gallery_split=gallery,
            dataset_fingerprint=metadata.fingerprint,
        )
        printer(
            f"{config.train.num_workers} workers, global batch {config.global_batch_size}, "
            f"{data.steps_per_epoch} steps/epoch x {config.train.epochs} epochs on "
            f"{data.num_train_examples} images of {data.num_train_classes} classes",
            flush=True,
        )
        train_storage, train_filesystem = _train_storage(config)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config_to_dict(config), "plan": plan},
            scaling_config=scaling_config(config),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=train_storage,
                storage_filesystem=train_filesystem,
                worker_runtime_env={"env_vars": worker_env},
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.checkpoints_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
                callbacks=list(callbacks),
            ),
            datasets={
                **_trainer_datasets(data),
                **({"gallery": _eval_split_dataset(config, root, gallery)} if gallery else {}),
                # The seen-class accuracy classifies the held-out training images by their
                # neighbours among the rest, so the ranks embed the whole training split.
                **({"seen": _eval_split_dataset(config, root, config.data.train_split)} if len(data.holdout_ids) else {}),
            },
            dataset_config=trainer_data_config(data),
        )
        if actor_name:
            resume_state = saved_refresh_state(resume_from)
            # Held here for the whole run: a restarted actor is constructed again from it.
            resume_ref = None if resume_state is None else ray.put(resume_state)
            refresh_actor = start_refresh_actor(config, actor_name, data, run_id, uri, resume_ref, worker_env)
            if resume_state is not None:
                printer(
                    f"refresh actor resumes from the checkpoint's index (model step "
                    f"{resume_state['index']['model_step']})",
                    flush=True,
                )
            printer(
                f"refresh actor {actor_name}: re-embeds the training set and rebuilds its index every "
                f"{plan.refresh_every_steps} steps",
                flush=True,
            )
            if config.train.use_gpu and not config.refresh.num_gpus:
                printer("note: the refresh actor re-embeds on its CPUs (refresh.num_gpus=0); give it a "
                        "share of a worker's GPU: train.gpus_per_worker=0.9 refresh.num_gpus=0.1", flush=True)
        result = _fit(trainer, queue, printer)
        if refresh_actor is not None:  # its last refreshes' metrics, before the run is closed
            not_logged += close_refresh_metrics(refresh_actor, uri, run_id, printer)
        if result.checkpoint is not None:
            checkpoint_path = checkpoint_uri(_storage_path(config), result.checkpoint.path)
            with result.checkpoint.as_directory() as directory:
                metrics = load_metrics(directory)
                not_logged += record_finished_run(config, root, uri, run_id, directory, printer)
        else:
            not_logged += tracking.finish_run(uri, run_id, None, failed=False)
        failed = False
    except (RunInterrupted, KeyboardInterrupt):
        interrupted = True
        raise
    except SystemExit as err:  # Ray's SIGTERM handler outside fit(): while the run starts or closes
        interrupted = True
        # No Ray Train controller runs before fit() or after it returns: the record is final.
        raise RunInterrupted("the job was stopped") from err
    finally:
        # A SIGTERM now waits until the run is closed (its status written, its lock let go):
        # raised here, it would skip the rest.
        stopped: list[bool] = []
        with _sigterm_watch(threading.current_thread() is threading.main_thread(), stopped, chain=False):
            if refresh_actor is not None:
                # Closed above when training ended; a failed or stopped run's actor may still hold
                # what an outage of the server kept from MLflow.
                flush_s = REFRESH_METRICS_FLUSH_STOPPED_S if interrupted else REFRESH_METRICS_FLUSH_S
                end_refresh_actor(refresh_actor, uri, run_id, printer, flush_s if failed else None)
            if failed:
                tracking.print_not_recorded(
                    tracking.finish_run(uri, run_id, None, failed=True, killed=interrupted), uri, run_id, printer
                )
            held.close()
        if stopped and sys.exc_info()[1] is None:  # closed as it would have been: now the stop
            raise RunInterrupted("the job was stopped")
    return RunSummary(name, run_id, uri, metrics, checkpoint_path, tuple(not_logged))


def _remove_unregistered_checkpoints(storage_path: str, name: str, printer) -> None:
    """Remove the run's checkpoints Ray Train's record does not hold (a job stopped between an
    upload and its registration, or one whose record dropped them): no rerun resumes from them
    and `checkpoints_to_keep` never removes them. Only under the run's lock."""
    try:
        filesystem, stale = unregistered_checkpoints(storage_path, name)
        for directory in stale:
            filesystem.delete_dir(directory)
    except (OSError, CheckpointRecordUnreadable) as err:  # housekeeping: the run goes on
        printer(f"warning: run {name}: could not remove the checkpoints Ray Train's record does not "
                f"hold ({err})", flush=True)
        return
    if stale:
        names = ", ".join(posixpath.basename(directory) for directory in stale)
        printer(f"run {name}: removed {len(stale)} checkpoint(s) that Ray Train's record does not "
                f"hold (left by a stopped job): {names}", flush=True)


def resume_hint(config: Config, settled: bool = True) -> str:
    """What a rerun of the same command does for `config`'s run: where it resumes from. With
    `settled` False (`RunInterrupted.settled`), Ray Train may still register a later checkpoint,
    and the hint says so rather than name a step a rerun would not resume from."""
    name = run_name_for(config)
    try:
        found = registered_checkpoint(_storage_path(config), name)
    except ValueError:
        found = None
    later = "" if settled else " (or from a later one, if Ray Train registers one while the job stops)"
    if found is None:
        return f"run {name} has no checkpoint yet: the same command starts it again{later}"
    return f"the same command resumes run {name} from its checkpoint at step {found[2]}{later}"


def _fit(trainer, queue, printer):
    """`trainer.fit()`, with Ctrl+C working again afterwards, and a stop turned into
    `RunInterrupted`. In the main thread fit() installs Ray Train's own SIGINT handler, which
    aborts the run and then has fit() exit the process (SystemExit), and which stays
    installed: a Ctrl+C while the run is recorded would be ignored twice, then exit with
    status 0. A SIGTERM (`ray job stop`) is noted (`_sigterm_watch`): Ray's handler leaves the
    controller running, so the run's last checkpoint is not settled."""
    import signal

    from pipeline.progress import ProgressPrinter

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    sigterm: list[bool] = []
    try:  # (outside the watch: a SIGTERM in its own cleanup is caught too)
        with _sigterm_watch(main, sigterm):
            try:
                with ProgressPrinter(queue, printer):
                    return trainer.fit()
            finally:
                if main:
                    signal.signal(signal.SIGINT, before)
    except SystemExit as err:
        raise RunInterrupted("training was stopped (Ctrl+C, or the job was stopped)",
                             settled=not sigterm) from err


@contextlib.contextmanager
def _sigterm_watch(main: bool, seen: list, chain: bool = True):
    """Append True to `seen` when SIGTERM (`ray job stop`'s default) comes; with `chain`, then
    call the handler that was in place (Ray's, in a driver, which raises SystemExit: its code
    is 15, or 1 when the signal lands in a `ray.get`, so the exit cannot tell); without it,
    nothing more: the caller acts on `seen` once the block has ended.

    Python's handler replaces the one Ray's C++ core set, for the rest of the process: that
    one printed a "SIGTERM received" trace and aborted the process 3 s later; now the driver
    closes the run (its own waits are bounded) and exits. Outside the main thread (a Tune
    trial), or with a handler Python did not set, nothing is watched."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM) if main else None
    if before is None:
        yield
        return

    def on_sigterm(signum, frame):
        seen.append(True)
        if not chain:
            return
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # the default action: end the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


REFRESH_METRICS_FLUSH_S = 60.0
"""How long the refresh actor may take to send its queued metrics when training has ended (or
failed)."""

REFRESH_METRICS_FLUSH_STOPPED_S = 5.0
"""The same for a stopped run (Ctrl+C, `ray job stop`): whoever stopped it is waiting."""


def close_refresh_metrics(actor, uri: str, run_id: str, printer=print,
                          timeout_s: float = REFRESH_METRICS_FLUSH_S) -> list[str]:
    """Have the refresh actor send its queued metrics (`RefreshActor.close_metrics`, for at most
    `timeout_s`) before it is killed; prints and returns one line per metric MLflow did not get.
    Never raises: a Ctrl+C meanwhile ends the wait, and the metrics count as not sent."""
    import ray

    from pipeline.tracking import describe_error, print_not_recorded

    try:
        # Beyond its own deadline, time for a busy actor to take the call (less for a stopped run).
        lines = ray.get(actor.close_metrics.remote(timeout_s), timeout=timeout_s + min(timeout_s, 30))
    except Exception as err:  # noqa: BLE001 - a dead or stuck actor must not cost the run its record
        lines = [f"refresh metrics: not sent ({describe_error(err)})"]
    except KeyboardInterrupt:  # the caller goes on to close the run: a second Ctrl+C ends the wait only
        lines = ["refresh metrics: not sent (interrupted)"]
    print_not_recorded(lines, uri, run_id, printer, what="every refresh metric")
    return lines


def end_refresh_actor(actor, uri: str, run_id: str, printer=print, flush_s: float | None = None) -> None:
    """Kill the run's refresh actor, first having it send its queued metrics for at most
    `flush_s` (`close_refresh_metrics`; None: they were closed already)."""
    import ray

    if flush_s is not None:
        close_refresh_metrics(actor, uri, run_id, printer, flush_s)
    ray.kill(actor, no_restart=True)


def scaling_config(config: Config):
    """Ray Train's workers: CPUs each and, on GPUs, `train.gpus_per_worker` of one each (a
    fraction leaves room on the same GPU for the refresh actor's `refresh.num_gpus`)."""
    import ray.train

    resources = {"CPU": config.train.cpus_per_worker}
    if config.train.use_gpu:
        resources["GPU"] = config.train.gpus_per_worker
    return ray.train.ScalingConfig(
        num_workers=config.train.num_workers, use_gpu=config.train.use_gpu, resources_per_worker=resources
    )


def _trainer_datasets(data) -> dict:
    """'train' split across ranks, or 'train_<rank>' (one stream per rank), plus 'test'."""
    if isinstance(data.train, list):
        return {**{f"train_{rank}": ds for rank, ds in enumerate(data.train)}, "test": data.test}
    return {"train": data.train, "test": data.test}


def trainer_data_config(data):
    """Ray Train's data config: 'train' split equally across the ranks, or, with a stream per
    rank, each 'train_<rank>'; either way delivered in plan order.

    In order, the equal split deals the blocks out the same way in every run (Ray's
    OutputSplitter gives each block to the rank that has had the fewest rows, the lowest rank
    on a tie; without locality hints, which `preserve_order` turns off), so every run of a
    config and seed trains on the same global batches.

    A per-rank stream's planner holds back while its step is more than
    `refresh.max_plan_ahead_steps` ahead of training. Unordered, Ray Data hands the decode actor
    whichever read task finished first, so it can block on a far step while an earlier
    sub-batch, one training is waiting for, sits behind it in the actor's queue: each such
    step then waits out `ActorTables.max_wait_s` (a PDDM run was seen losing 120 s a step this
    way). In order, the actor plans only what the iterator's prefetch asks for next.

    The evaluation splits are dealt out too, whole (`training.ingest.RunDataConfig`).
    """
    from pipeline.training.ingest import RunDataConfig

    ordered = RunDataConfig.default_ingest_options()
    ordered.preserve_order = True
    if not isinstance(data.train, list):
        return RunDataConfig(datasets_to_split=["train"], execution_options={"train": ordered})
    return RunDataConfig(execution_options={f"train_{rank}": ordered for rank in range(len(data.train))})


def saved_refresh_state(found) -> dict | None:
    """The refresh actor's state in `found` = (filesystem, directory, step), the checkpoint a
    rerun resumes from, if it holds one."""
    import io

    from pipeline.training.refresh_link import REFRESH_STATE_FILE, read_refresh_state

    if found is None:
        return None
    filesystem, directory, _ = found
    try:
        with filesystem.open_input_stream(f"{directory}/{REFRESH_STATE_FILE}") as stream:
            return read_refresh_state(io.BytesIO(stream.read()))
    except FileNotFoundError:  # saved while the actor was restarting: rank 0 rebuilds it
        return None


def start_refresh_actor(config: Config, actor_name: str, data, run_id: str, uri: str, resume_state=None,
                        env_vars: dict[str, str] | None = None):
    """Start the run's refresh actor with its own resources; it begins embedding at once,
    or, for a resumed run, goes on from the checkpoint's index and losses (`resume_state`, a
    dict or an ObjectRef of one). `env_vars`: the storage settings the Train workers get
    (`storage.worker_env_vars`), which an actor on another node would not have.

    Threaded (max_concurrency) so that planners, losses and weights are served while a
    refresh runs in its background thread; restarted by Ray if it dies.
    """
    import ray

    from pipeline.refresh.actor import RefreshActor

    return (
        ray.remote(RefreshActor)
        .options(
            name=actor_name,
            num_cpus=config.refresh.num_cpus,
            num_gpus=config.refresh.num_gpus,
            max_restarts=config.refresh.max_restarts,
            max_concurrency=16,
            # The S3 endpoint and retries (a pretrained model on S3, the MLflow artifact store):
            # the driver's environment reaches only processes started on its own node.
            runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
            # Outside any placement group of the caller: a sweep trial's driver runs in Tune's
            # 1-CPU trial group, which refuses the actor; the sweep counts its CPUs itself.
            scheduling_strategy="DEFAULT",
        )
        .remote(config_to_dict(config), data.store, data.holdout_ids, run_id, uri, resume_state)
    )
