"""Whether a rerun may resume the run of the same name: Ray Train resumes any run folder of that
name, so a `train.run_name` reused with another loss, model or data would silently continue the
old run's weights and MLflow record under the new settings. A run stopped before its first
checkpoint has no weights to resume, but its MLflow run is reopened: its record is compared.

The data is compared by its fingerprint where the checkpoint keeps it (`RUN_FILE`): a copy
of the dataset at another `data.root` (moved to S3, say) resumes, and a dataset rewritten in
place (converted again with other options) does not."""

from __future__ import annotations

from pipeline.config import Config, ConfigError, flatten

RESUME_MAY_CHANGE = frozenset({
    # Where things run and are kept, and how fast: not what is learned.
    "data.cache_dir", "data.decode_actors", "data.decode_cpus", "data.prefetch_batches",
    "model.channels_last", "model.pretrained",  # the checkpoint's weights replace pretrained ones
    "train.cpus_per_worker", "train.use_gpu", "train.gpus_per_worker", "train.torch_threads",
    "train.log_every_steps", "train.storage_path", "train.run_name", "train.checkpoints_to_keep",
    "train.max_failures",
    "train.epochs",  # a run resumed with more epochs goes on training: the usual way to extend one
    "refresh.num_cpus", "refresh.num_gpus", "refresh.batch_size", "refresh.cache_max_mb",
    "refresh.max_restarts",
    "eval.every_epochs", "eval.batch_size", "eval.recall_ks", "eval.nmi", "eval.cache_max_mb",
    "eval.seen_knn_k", "eval.metrics_cpus",  # what is measured and where, not what is learned
    "tracking.tracking_uri", "tracking.experiment", "tracking.log_model",
    "storage.s3_endpoint_url", "storage.s3_max_attempts",
})
"""Settings a resumed run may change; any other difference from the checkpoint's config refuses."""


def changed_settings(saved: Config, config: Config, may_change: frozenset = RESUME_MAY_CHANGE) -> list[str]:
    """`key: saved -> new` for each setting outside `may_change` that differs."""
    before, after = flatten(saved), flatten(config)
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in may_change and before.get(key) != after.get(key)
    ]


def check_resume(config: Config, run_name: str, resume_from, dataset_fingerprint: str) -> Config:
    """Raise ValueError when the checkpoint a rerun would resume from (`registered_checkpoint`'s
    (filesystem, directory, step)) was trained with settings that change what is learned, or on
    another dataset than the one (`dataset_fingerprint`) the rerun would train on; else return
    the checkpoint's config."""
    from pipeline.training.checkpoint import (
        CONFIG_FILE,
        load_checkpoint_config,
        load_run_record,
    )

    filesystem, directory, step = resume_from
    found = f"run {run_name!r} has a checkpoint at step {step}"
    try:
        saved = load_checkpoint_config(directory, filesystem)
    except ConfigError as err:
        raise ValueError(f"train.run_name: {found} whose {CONFIG_FILE} no longer loads ({err}); "
                         f"choose another train.run_name") from err
    trained_on = load_run_record(directory, filesystem).get("dataset_fingerprint", "")
    _refuse_changes(config, saved, trained_on, dataset_fingerprint, f"{found} ({directory})", "resume it")
    return saved


def check_schedule(config: Config, run_name: str, saved: Config, step: int, last_logged_step: int) -> None:
    """Raise ValueError when a resume from the checkpoint at `step` (trained with `saved`)
    changes `train.epochs`, and so the learning-rate schedule, of a run whose MLflow record
    already holds steps past `step`: values a stopped attempt logged after its last checkpoint,
    under the old schedule, which the rerun would not replace (MLflow keeps one value a step)."""
    if saved.train.epochs == config.train.epochs or last_logged_step <= step:
        return
    raise ValueError(
        f"train.epochs: run {run_name!r} resumes from its checkpoint at step {step}, but its MLflow "
        f"record holds steps up to {last_logged_step}, logged under train.epochs="
        f"{saved.train.epochs} after that checkpoint; with train.epochs={config.train.epochs} the "
        f"record would mix two schedules. Rerun with train.epochs={saved.train.epochs} first (it "
        f"then resumes from its end), or choose another train.run_name"
    )


def resume_changes(saved: Config, config: Config) -> str:
    """The settings a resume changes (`key: saved -> new; ...`), "" if none: kept as a tag,
    since MLflow params cannot change."""
    return "; ".join(changed_settings(saved, config, frozenset()))


def check_recorded_run(config: Config, run_name: str, recorded, dataset_fingerprint: str) -> None:
    """Raise ValueError when the MLflow run a rerun would write into (`tracking.recorded_run`:
    a run stopped before its first checkpoint) was started with settings that change what is
    learned, or on another dataset: its record would mix two runs."""
    from pipeline.config import config_from_yaml

    if recorded.config_yaml is None:
        return
    found = f"run {run_name!r} has no checkpoint yet, but an MLflow run ({recorded.run_id})"
    try:
        saved = config_from_yaml(recorded.config_yaml)
    except ConfigError as err:
        raise ValueError(f"train.run_name: {found} whose config.yaml no longer loads ({err}); "
                         f"choose another train.run_name") from err
    _refuse_changes(config, saved, recorded.dataset_fingerprint, dataset_fingerprint, found,
                    "write into its record")


def _refuse_changes(config: Config, saved: Config, trained_on: str, dataset_fingerprint: str,
                    found: str, consequence: str) -> None:
    """The shared rule: settings outside RESUME_MAY_CHANGE, and the data by its fingerprint
    where it is known (else by `data.root`)."""
    if not trained_on:  # an older checkpoint: the dataset is known by its root only
        changed = changed_settings(saved, config)
    elif trained_on == dataset_fingerprint:  # the same images, wherever they are now
        changed = changed_settings(saved, config, RESUME_MAY_CHANGE | {"data.root"})
    else:
        changed = changed_settings(saved, config) + [
            f"the dataset's fingerprint: {trained_on[:12]}... -> {dataset_fingerprint[:12]}..."
        ]
    if changed:
        raise ValueError(
            f"train.run_name: {found} trained with other settings, and a rerun would "
            f"{consequence}: {'; '.join(changed)}. Choose another train.run_name for a new run, "
            f"or rerun with its settings"
        )
