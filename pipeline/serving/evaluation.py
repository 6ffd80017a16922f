"""Evaluate any checkpoint on any dataset in the project's format and record it in MLflow.

The checkpoint's own config, with `--set` overrides on top, says which dataset (`data.root`,
or the built-in one), which split (`data.test_split`), the evaluation transform and the metrics
(`eval.*`); pointed at another dataset, the split and Recall@K cut-offs follow that dataset's
protocol unless `--set` gives them. Each evaluation is its own MLflow run, named from the
training run, the checkpoint step and the dataset (no timestamps), tagged with the checkpoint
it read.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from pipeline.config import config_to_yaml, load_config
from pipeline.data.format import read_metadata, shard_uris, validate_dataset
from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic
from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.serving.checkpoints import fetch_checkpoint, load_served_checkpoint
from pipeline.serving.driver_tasks import cluster_task_cpus, task_result, use_reserved_cpus
from pipeline.serving.embedding import (
    check_actors_fit_locally,
    collect_embeddings,
    embed_split,
    embedding_actors,
    start_ray,
)
from pipeline.storage import export_settings, exported_settings, store_errors_named
from pipeline.training.checkpoint import CONFIG_FILE, load_run_record


@dataclass
class EvaluationSummary:
    """What an evaluation reports back to its caller."""

    run_name: str
    run_id: str
    tracking_uri: str
    metrics: dict
    """`<split>/<metric>` -> value, e.g. `test/recall@1`."""
    not_logged: tuple[str, ...] = ()
    """What the tracking server did not get (metrics, run status); empty = all."""


RECORD_RETRY_S = 60.0
"""How long the metrics and the run's status are retried while the tracking server is away."""


def metrics_task_resources(device: str, gpus_up: int, cpus: int) -> dict:
    """The Ray resources of the task that computes the metrics, asked for once the images are
    embedded: a GPU with `--device gpu`, or with `auto` when the cluster has one up by then
    (on `cluster.yaml` the embedding actors themselves may have brought up a GPU node), else
    `cpus` CPUs (`driver_tasks.task_cpus`), on which the task ranks. Not on the driver
    (`pipeline.serving.driver_tasks` says why).
    """
    gpus = embedding_actors(device, 0, gpus_up)["num_gpus"]
    return {"num_gpus": gpus, "num_cpus": 1 if gpus else cpus}


def check_metrics_cpus_fit_locally(cpus: int, device: str) -> None:
    """Raise ValueError when a local Ray (no RAY_ADDRESS) would rank on the CPU and has fewer
    logical CPUs than `eval.metrics_cpus` asks: the metrics task would wait for ever, and only
    once every image was embedded."""
    from pipeline.training.resources import local_resources, uses_local_ray

    if not uses_local_ray():
        return
    have = local_resources()
    if metrics_task_resources(device, int(have["GPU"]), cpus)["num_gpus"] == 0 and cpus > have["CPU"]:
        raise ValueError(f"eval.metrics_cpus: {cpus} CPUs do not fit the {have['CPU']:g} logical CPUs of a "
                         "local Ray; lower it (0 = those free), or set RAY_ADDRESS to run on a cluster")


def embedded_split_metrics(test, gallery, ks: tuple, nmi: bool) -> dict[str, float]:
    """Ray task: the retrieval metrics of an `embed_split` dataset (queries ranked against the
    `gallery` one when given, else against each other), on the GPU Ray gave this task if any,
    else on the CPUs it reserved."""
    import ray

    from pipeline.device_feed import granted_device

    _, labels, embeddings = collect_embeddings(test)
    against = {}
    if gallery is not None:
        _, gallery_labels, gallery_embeddings = collect_embeddings(gallery)
        against = {"gallery_embeddings": gallery_embeddings, "gallery_labels": gallery_labels}
    device = granted_device(ray.get_gpu_ids(), torch.cuda.is_available())
    if device.type == "cpu":
        use_reserved_cpus()
    values = retrieval_metrics(
        embeddings, labels, **against, ks=ks, compute_nmi=nmi, use_gpu=device.type == "cuda"
    )
    return {key: float(value) for key, value in values.items()}


def storage_path_of(overrides: list[str]) -> str:
    """`train.storage_path` as the overrides set it (where run names are looked up)."""
    return load_config(None, overrides, consistent=False).train.storage_path


def evaluation_run_name(
    source_run: str,
    step,
    dataset_name: str,
    fingerprint: str,
    split: str,
    gallery_split: str | None,
) -> str:
    """A stable name: evaluating the same checkpoint on the same data again reopens the run."""
    splits = split if gallery_split is None else f"{split}-vs-{gallery_split}"
    return f"eval-{source_run}-step{step}-{dataset_name}-{fingerprint[:8]}-{splits}"


LEFT_TO_THE_DATASET = {"eval.recall_ks": "[]", "data.test_split": ""}
"""The settings a dataset's protocol resolves (`pipeline.evaluation.protocol`), left empty."""


def evaluation_config(config_file: str, trained_config, overrides: list[str]):
    """The checkpoint's config with `overrides` on top. Its `eval.recall_ks` and
    `data.test_split` are those its training resolved for its own dataset: pointed at another
    dataset, the two are left to that dataset's protocol again, unless `overrides` set them."""
    config = load_config(config_file, overrides)
    if (config.data.root, config.data.synthetic) == (
        trained_config.data.root,
        trained_config.data.synthetic,
    ):
        return config
    given = {item.partition("=")[0].strip() for item in overrides}
    cleared = [f"{key}={empty}" for key, empty in LEFT_TO_THE_DATASET.items() if key not in given]
    return load_config(config_file, cleared + overrides)


def evaluate_checkpoint(
    reference: str,
    overrides: list[str] | None = None,
    *,
    gallery_split: str | None = None,
    device: str = "auto",
    verbose: bool = False,
    printer=print,
) -> EvaluationSummary:
    """Recall@K, MAP@R, R-Precision and NMI of the checkpoint `reference` (a directory or a run
    name) on `data.test_split`: queries against each other, or against `gallery_split` (by
    default the dataset's, when its metadata.json names a query/gallery protocol). The images
    are embedded on `device`'s actors (`embedding.DEVICES`)."""
    overrides = list(overrides or [])
    check_actors_fit_locally(0, device)
    # The command line's storage settings (an S3 endpoint, its retries) reach the checkpoint;
    # then the evaluation's own, the checkpoint's config under them, reach the dataset. Put
    # back as they were when it returns.
    # Not checked against the defaults: `data.image_size=224` fits a checkpoint trained at 224
    # px but not the default eval_resize. The checkpoint's config with them on top is checked.
    with exported_settings(load_config(None, overrides, consistent=False)):
        return _evaluate(reference, overrides, gallery_split, device, verbose, printer)


def _evaluate(reference: str, overrides: list[str], gallery_split: str | None, device: str, verbose: bool,
              printer) -> EvaluationSummary:
    from pipeline import tracking
    from pipeline.evaluation.protocol import gallery_split as dataset_gallery_split
    from pipeline.evaluation.protocol import resolve_evaluation
    from pipeline.training.driver import run_name_for

    with tempfile.TemporaryDirectory() as scratch:
        with store_errors_named(f"checkpoint {reference}"):
            directory = fetch_checkpoint(reference, storage_path_of(overrides), scratch)
        model, trained_config, step = load_served_checkpoint(directory)
        config = evaluation_config(f"{directory}/{CONFIG_FILE}", trained_config, overrides)
        source = load_run_record(directory)
    export_settings(config)
    check_metrics_cpus_fit_locally(config.eval.metrics_cpus, device)
    # (A checkpoint from before checkpoints named their run: the name its config hashes to,
    # right only when the run left no evaluation setting to its dataset's protocol.)
    source_run = source.get("run_name") or run_name_for(trained_config)
    shown = reference if "://" in reference else directory  # a fetched copy is gone by now

    # Without data.root the built-in dataset is generated under data.cache_dir.
    data_setting = "data.root" if config.data.root else "data.cache_dir"
    with store_errors_named(data_setting):
        if config.data.root:
            root = config.data.root
        else:
            root = ensure_synthetic(config.data.cache_dir, SyntheticSpec(**vars(config.data.synthetic)))
        metadata = read_metadata(root)
    # The dataset's own protocol (In-Shop: query vs gallery, its Recall@K cut-offs) where the
    # settings are left empty, as in training.
    config = resolve_evaluation(config, metadata)
    gallery_split = gallery_split or dataset_gallery_split(config, metadata) or None
    split = config.data.test_split
    for name, where in ((split, "data.test_split"), (gallery_split, "gallery split")):
        if name is not None and name not in metadata.splits:
            raise ValueError(
                f"{where}: {root} has no split {name!r} (it has {', '.join(metadata.splits)})"
            )
    with store_errors_named(data_setting):
        validate_dataset(root)

    name = evaluation_run_name(
        source_run, step, metadata.name, metadata.fingerprint, split, gallery_split
    )
    uri = tracking.tracking_uri(config)
    tracking.check_store(uri, tracking.tracking_setting(config))
    run_id = tracking.start_run(
        config,
        name,
        config_to_yaml(config),
        tags={
            "pipeline.kind": "evaluation",
            "evaluation.checkpoint": shown,
            "evaluation.source_run": source_run,
            "evaluation.source_run_id": source.get("run_id", "unknown"),
            "evaluation.checkpoint_step": str(step),
            "git_commit": tracking.git_commit(),
            "dataset.name": metadata.name,
            "dataset.fingerprint": metadata.fingerprint,
            "dataset.root": root,
        },
    )
    printer(
        f"evaluate {shown} (run {source_run}, step {step}) on {metadata.name} {split}"
        f"{'' if gallery_split is None else ' against ' + gallery_split}: MLflow run {run_id}",
        flush=True,
    )
    failed = True
    not_logged: list[str] = []
    try:
        start_ray(verbose)
        import ray

        batch_size = config.eval.batch_size

        def embedded(name: str):  # left in the object store, where the embedding actors put it
            return embed_split(
                model, config, shard_uris(root, name), batch_size, device=device, printer=printer
            ).materialize()

        test = embedded(split)
        gallery = None if gallery_split is None else embedded(gallery_split)
        # Asked for once the embedding is done and its actors are let go: on a machine with one
        # GPU the task would otherwise hold the GPU an actor waits for.
        cpus = cluster_task_cpus(config.eval.metrics_cpus)
        resources = metrics_task_resources(device, int(ray.cluster_resources().get("GPU", 0)), cpus)
        # No retries: a worker killed for memory would be killed again, after as long.
        task = ray.remote(embedded_split_metrics).options(**resources, max_retries=0)
        values = task_result(task.remote(test, gallery, tuple(config.eval.recall_ks), config.eval.nmi))
        del test, gallery  # the embeddings leave the object store while the metrics are logged
        metrics = {f"{split}/{key}": value for key, value in values.items()}
        logger = tracking.MetricsLogger(uri, run_id)
        logger.log(metrics, step or 0)
        # Sent before the run is closed: the logger's thread would otherwise send them after
        # (or, when the job's process exits first, never).
        not_logged += logger.close(timeout_s=RECORD_RETRY_S).describe()
        failed = False
    finally:
        not_logged += tracking.finish_run(uri, run_id, None, failed=failed, retry_s=RECORD_RETRY_S)
    tracking.print_not_recorded(not_logged, uri, run_id, printer)
    return EvaluationSummary(name, run_id, uri, metrics, tuple(not_logged))
