"""Whether a rerun may resume the run of the same name: Ray Train resumes any run folder of that
name, so a `train.run_name` reused with another loss, model or data would silently continue the
old run's weights and MLflow record under the new settings."""

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
    "eval.seen_knn_k",  # what is measured, not what is learned
    "tracking.tracking_uri", "tracking.experiment", "tracking.log_model",
    "storage.s3_endpoint_url", "storage.s3_max_attempts",
})
"""Settings a resumed run may change; any other difference from the checkpoint's config refuses."""


def changed_settings(saved: Config, config: Config) -> list[str]:
    """`key: saved -> new` for each setting outside RESUME_MAY_CHANGE that differs."""
    before, after = flatten(saved), flatten(config)
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in RESUME_MAY_CHANGE and before.get(key) != after.get(key)
    ]


def check_resume(config: Config, run_name: str, resume_from) -> None:
    """Raise ValueError when the checkpoint a rerun would resume from (`registered_checkpoint`'s
    (filesystem, directory, step)) was trained with settings that change what is learned."""
    from pipeline.training.checkpoint import CONFIG_FILE, load_checkpoint_config

    filesystem, directory, step = resume_from
    try:
        saved = load_checkpoint_config(directory, filesystem)
    except ConfigError as err:
        raise ValueError(
            f"train.run_name: run {run_name!r} has a checkpoint at step {step} whose "
            f"{CONFIG_FILE} no longer loads ({err}); choose another train.run_name"
        ) from err
    changed = changed_settings(saved, config)
    if changed:
        raise ValueError(
            f"train.run_name: run {run_name!r} has a checkpoint at step {step} ({directory}) "
            f"trained with other settings, and a rerun would resume it: {'; '.join(changed)}. "
            f"Choose another train.run_name for a new run, or rerun with its settings"
        )
