"""Embed a dataset split with Ray Data batch inference: one model per actor, on a GPU each when
the cluster has GPUs (or `--device gpu` asks for them), else on fractional CPUs.

Images get the evaluation transform the model was trained with (resize, center crop), so an
exported embedding is exactly what the training run's evaluation computed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.decoding import decode_rgb, eval_transform
from pipeline.device_feed import autocast_dtype, granted_device
from pipeline.serving import DEVICES

EMBEDDING_COLUMN = "embedding"
"""Fixed-size list of float32 per row, beside `id` and `label`."""
CPU_ACTOR_CPUS = 0.5
"""CPUs each embedding actor reserves when there is no GPU (fractions share small machines)."""


def embedding_actors(device: str, actors: int, gpus_up: int) -> dict:
    """The actor pool `embed_split` asks Ray Data for: its `size`, and `num_gpus` / `num_cpus`
    per actor. `actors` = 0 means one per GPU up (at least one), or one on CPUs."""
    if device not in DEVICES:
        raise ValueError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")
    on_gpu = device == "gpu" or (device == "auto" and gpus_up > 0)
    if on_gpu:
        return {"size": actors or max(1, gpus_up), "num_gpus": 1, "num_cpus": 1}
    return {"size": actors or 1, "num_gpus": 0, "num_cpus": CPU_ACTOR_CPUS}


def start_ray(verbose: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS (or start a local one) as training runs do, with
    Ray Data's progress output only when `verbose`."""
    import logging

    import ray.data

    from pipeline.training.driver import _init_ray

    _init_ray(verbose)
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose


class EmbedImages:
    """Ray Data callable class: encoded image rows in, `id`, `label`, `embedding` rows out."""

    def __init__(self, weights: list, model_config: dict, image_size: int, resize: int):
        """`weights` is `[ObjectRef of the state_dict]` (in a list so that Ray Data passes the
        reference, not the fetched dict); the model is built once per actor."""
        import ray

        from pipeline.models import EmbeddingNet

        # The GPU Ray gave this actor: a CPU actor on a GPU node sees the node's GPUs too.
        self.device = granted_device(ray.get_gpu_ids(), torch.cuda.is_available())
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.model = EmbeddingNet(**model_config)
        self.model.load_state_dict(ray.get(weights[0]))
        self.model.to(self.device).eval()
        self.transform = eval_transform(image_size, resize)
        self.autocast = autocast_dtype(self.device)  # the training run's evaluation's precision

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = torch.stack([self.transform(decode_rgb(data)) for data in batch["image"]])
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            embeddings = self.model(images.to(self.device).float().div_(255))
        return embeddings_table(batch["id"], batch["label"], embeddings.float().cpu().numpy())


def embeddings_table(ids: np.ndarray, labels: np.ndarray, embeddings: np.ndarray) -> pa.Table:
    """The exported rows: id (int64), label (int32), embedding (fixed-size list of float32)."""
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            "id": pa.array(np.asarray(ids), pa.int64()),
            "label": pa.array(np.asarray(labels), pa.int32()),
            EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1]),
        }
    )


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The `embedding` column of a table as a float32 array [N, D]."""
    column = table.column(EMBEDDING_COLUMN).combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def check_actors_fit_locally(actors: int, device: str = "auto", flag: str = "--actors") -> None:
    """Raise ValueError naming the flag when a local Ray (no RAY_ADDRESS) cannot hold the
    embedding actors `embedding_actors(device, actors, ...)` asks for and a read task: Ray Data
    would wait for ever for actors it cannot place."""
    from pipeline.data.ray_datasets import READ_CPUS
    from pipeline.training.resources import local_resources, uses_local_ray

    if device not in DEVICES:
        raise ValueError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")
    if not uses_local_ray():
        return
    have = local_resources()
    if device == "gpu" and not have["GPU"]:
        raise ValueError("--device gpu: this machine has no GPU for the embedding actors; use --device auto "
                         "or cpu, or set RAY_ADDRESS to run on a cluster")
    pool = embedding_actors(device, actors, int(have["GPU"]))
    if pool["num_gpus"]:
        if pool["size"] > have["GPU"]:
            raise ValueError(f"{flag}: {actors} embedding actors need a GPU each but this machine has "
                             f"{have['GPU']:g}; lower it, or set RAY_ADDRESS to run on a cluster")
    elif pool["size"] * CPU_ACTOR_CPUS + READ_CPUS > have["CPU"]:
        most = int((have["CPU"] - READ_CPUS) / CPU_ACTOR_CPUS)
        raise ValueError(f"{flag}: {pool['size']} embedding actors of {CPU_ACTOR_CPUS:g} CPU each do not fit the "
                         f"{have['CPU']:g} logical CPUs of a local Ray (at most {most}); lower it, or set "
                         "RAY_ADDRESS to run on a cluster")


def embed_split(model, config, shard_uris: list[str], batch_size: int, actors: int = 0,
                device: str = "auto", printer=print):
    """Ray Dataset of the embeddings of the shards' images under `model` (an EmbeddingNet built
    from `config.model`), with `config.data`'s evaluation transform, on the actors
    `embedding_actors(device, actors, <GPUs in the cluster now>)` describes.
    """
    import ray
    import ray.data

    from pipeline.data.ray_datasets import read_shards
    from pipeline.training.resources import uses_local_ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = embedding_actors(device, actors, gpus)
    if pool["num_gpus"] and not gpus:
        printer(f"--device gpu: no GPU is up in the cluster yet; the {pool['size']} embedding actor(s) wait "
                "for the autoscaler to add GPU nodes (on a fixed-size cluster they would wait for ever)",
                flush=True)
    elif device == "auto" and not gpus and not uses_local_ray():
        # cluster.yaml's GPU nodes scale to zero between jobs: an idle cluster has none up.
        printer("no GPU is up in the cluster: embedding on CPUs; --device gpu asks the autoscaler for "
                "GPU nodes instead", flush=True)
    weights = ray.put({k: v.cpu() for k, v in model.state_dict().items()})
    model_config = {
        "backbone": config.model.backbone,
        "embedding_dim": config.model.embedding_dim,
        "normalize": config.model.normalize,
    }
    return (
        read_shards(shard_uris)  # s3://: the configured endpoint and retry budget
        .select_columns(["id", "label", "image"])
        .map_batches(
            EmbedImages,
            fn_constructor_kwargs={
                "weights": [weights],
                "model_config": model_config,
                "image_size": config.data.image_size,
                "resize": config.data.eval_resize,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool["size"]),
            num_gpus=pool["num_gpus"],
            num_cpus=pool["num_cpus"],
        )
    )


def collect_embeddings(dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (ascending), labels and embeddings [N, D] of an `embed_split` dataset, gathered in
    this process, which holds the split about once: the ids are read first, then each block
    is written into its place (blocks arrive in any order) and let go. Concatenating the
    blocks and sorting them held it twice (1M x 512: a rise of 2.01x the split against 1.03x,
    benchmarks/README.md). A dataset not materialized yet is materialized first, since its
    blocks are read twice (a Ray task passes one materialized already: materializing runs the
    embedding, whose actors could wait for the CPUs the task holds). Raises if the split has
    no images or an id came twice."""
    from ray.data.dataset import MaterializedDataset

    from pipeline.evaluation.gather import rows_in_place, sorted_ids

    if not isinstance(dataset, MaterializedDataset):
        dataset = dataset.materialize()
    # Whole blocks, not select_columns(["id"]): a projection would run Ray tasks, which could
    # wait for the CPUs a task calling this holds.
    id_pieces = [batch.column("id").to_numpy()
                 for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow")]
    if not sum(len(piece) for piece in id_pieces):
        raise ValueError("the split yielded no images")
    ids = sorted_ids(id_pieces, "embedded")
    placed = ((np.searchsorted(ids, batch.column("id").to_numpy()), embedding_matrix(batch),
               batch.column("label").to_numpy())
              for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    embeddings, labels = rows_in_place(len(ids), placed)
    return ids, labels, embeddings
