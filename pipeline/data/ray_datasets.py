"""The Ray Data graphs that feed training and evaluation.

Training: a dataset of *plan indices* (one row per sub-batch of the whole run, every epoch
included) mapped by `TrainBatchDecoder` actors into decoded sub-batches; Ray Train's
`streaming_split(equal=True)` deals them out in plan order, the same way in every run (or, for
planners that follow the model, each rank has a stream of its own: plan indices r, r + W, ...).
Evaluation: the test split's shards read and decoded by stateless tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.decoding import EncodedImageStore, TrainBatchDecoder, decode_eval_batch
from pipeline.data.format import shard_uris
from pipeline.data.planning import build_planner, seen_holdout_ids

# Light CPU reservations for Data's tasks: on a 2-core machine the Train workers hold most of
# the CPUs, and a read task asking for a whole CPU would wait forever.
READ_CPUS = 0.25
EVAL_DECODE_CPUS = 0.25


@dataclass
class TrainingData:
    """Everything the driver builds about the data before the workers start."""

    train: object
    """Ray Dataset of decoded sub-batches (one row each), split across the ranks; or, for
    planners that follow the model, a list with one such dataset per rank."""
    test: object
    """Ray Dataset of decoded test images."""
    num_train_classes: int
    num_train_examples: int
    steps_per_epoch: int
    total_steps: int
    store: EncodedImageStore
    """The training split's encoded images (the refresh actor embeds them)."""
    holdout_ids: np.ndarray
    """Training-split ids held out of training for the seen-class accuracy."""
    start_step: int = 0
    """The step the training stream starts at (a resumed run's checkpoint step)."""


def read_shards(uris: list[str]):
    """A Ray Dataset of a split's shard files (paths or URIs of one store), read through the
    project's filesystem: on s3:// the configured endpoint and retry budget, which the copies
    sent to the read tasks keep (a filesystem Ray Data built from the URIs would retry 3 times).

    Every task that runs when the dataset is iterated asks for `READ_CPUS`. `ray.data.read_parquet`
    cannot promise that in Ray 2.60: its file listing runs then, as a `ListFiles` task asking for
    a whole CPU whatever `num_cpus` says, and a PDDM trial's driver, workers, decode actors and
    refresh actor leave only half a CPU of a 2-core machine's 4 logical ones, so its first
    evaluation waited for that task forever. Ray's Parquet source read through `read_datasource`
    lists and samples the files here, when the dataset is made (with Ray's default 1-CPU tasks:
    callers make their datasets before training takes the CPUs). An internal module; pyproject
    pins ray to 2.60.x."""
    import ray.data
    from ray.data._internal.datasource.parquet_datasource import ParquetDatasource

    from pipeline.storage import filesystem_for_files

    filesystem, paths = filesystem_for_files(uris)
    # This source's read tasks would retry S3's 503s and throttling themselves, on top of the
    # filesystem's configured attempts (storage.s3_max_attempts): the setting alone decides.
    # The dataset keeps a copy of the context current when it is made.
    context = ray.data.DataContext.get_current()
    retried, context.retried_io_errors = context.retried_io_errors, []
    try:
        return ray.data.read_datasource(ParquetDatasource(paths, filesystem=filesystem), num_cpus=READ_CPUS)
    finally:
        context.retried_io_errors = retried


def steps_per_epoch(config, num_examples: int) -> int:
    """Configured steps per epoch, or one pass over the training images."""
    return config.train.steps_per_epoch or max(1, num_examples // config.global_batch_size)


SHARED_STREAM_BLOCK = 8
"""Sub-batches per block of the shared training stream. One per block would deal exactly plan
index s * W + r to rank r at step s, but the input pipeline alone then ran 700-920 images/s
against 2,100-2,310 with 8 (dev VM, `benchmarks/input_pipeline.py --sub-batches 240`)."""


def build_training_data(config, root: str, refresh_actor: str = "", start_step: int = 0) -> TrainingData:
    """Read the splits with Ray Data and build the planned training stream and the eval stream.

    `refresh_actor` names the run's refresh actor, for planners that follow the model;
    `start_step` is the step a resumed run goes on from: its stream starts with that step's
    sub-batches, so a resumed run trains on the same plan as one never interrupted.
    """
    train_read = read_shards(shard_uris(root, config.data.train_split)).select_columns(
        ["id", "label", "image"]
    )
    store = EncodedImageStore.from_dataset(train_read)
    holdout = check_training_split(config, store.labels)
    per_epoch = steps_per_epoch(config, len(store) - len(holdout))
    planner = build_planner(config, store.labels, holdout, refresh_actor, config.refresh.every_steps or per_epoch)
    total = per_epoch * config.train.epochs
    start_step = min(start_step, total)  # a finished run rerun as it was: nothing left to plan
    num_sub_batches = (total - start_step) * config.train.num_workers
    decoder_args = {
        "planner": planner,
        "store": store,
        "image_size": config.data.image_size,
        "crop_scale_min": config.data.crop_scale_min,
        "seed": config.train.seed,
    }
    if config.uses_refresh_actor:
        # A planner that follows the model must not run far ahead of training, so it waits
        # for training to catch up (NeighbourhoodPlanner.max_ahead_steps). An equal
        # streaming_split cannot be combined with that: to keep the ranks equal it holds
        # sub-batches back until more are planned, and the planner waits for steps that
        # need those very sub-batches. So each rank gets its own stream instead - plan
        # indices rank, rank + W, ... - decoded by its own actors. One sub-batch per block:
        # a map task releases its output only when it ends, so a task holding two sub-batches
        # could wait to plan the second for a step that needs the first.
        ranks = config.train.num_workers
        train = [
            _decoded_stream(total - start_step, 1, decoder_args, config, offset=start_step * ranks + r, stride=ranks)
            for r in range(ranks)
        ]
    else:
        # Blocks of SHARED_STREAM_BLOCK sub-batches, so several decode actors work at once.
        # Delivered in plan order (`trainer_data_config`), the equal split deals the blocks
        # out in turn, the same way in every run: the seed alone decides which sub-batches
        # meet in a global batch. In arrival order the scheduler decided that (Recall@1 0.72
        # and 0.81 for two runs of one config and seed).
        train = _decoded_stream(
            num_sub_batches, SHARED_STREAM_BLOCK, decoder_args, config, offset=start_step * config.train.num_workers
        )
    test = read_shards(shard_uris(root, config.data.test_split)).select_columns(
        ["id", "label", "image"]
    ).map_batches(
        decode_eval_batch,
        fn_kwargs={"image_size": config.data.image_size, "resize": config.data.eval_resize},
        batch_size=128,
        num_cpus=EVAL_DECODE_CPUS,
    )
    return TrainingData(
        train=train,
        test=test,
        num_train_classes=len(store.classes),
        num_train_examples=len(store),
        steps_per_epoch=per_epoch,
        total_steps=total,
        start_step=start_step,
        store=store,
        holdout_ids=holdout,
    )


def plan_index_rows(count: int, blocks: int, num_cpus: float = READ_CPUS):
    """`ray.data.range(count)` in `blocks` blocks (column `id`), whose read tasks ask for
    `num_cpus`. `ray.data.range`'s own ask for a whole CPU each, which a Magnet trial's
    driver, workers, decode actors and refresh actor leave no room for on a 2-core machine's 4
    logical CPUs: the trial then never starts training."""
    # Ray's own range source (an internal module; pyproject pins ray to 2.60.x).
    import ray.data
    from ray.data._internal.datasource.range_datasource import RangeDatasource

    rows = RangeDatasource(n=count, block_format="arrow", column_name="id")
    return ray.data.read_datasource(rows, num_cpus=num_cpus, override_num_blocks=blocks)


def _decoded_stream(count: int, per_block: int, decoder_args: dict, config, offset: int = 0, stride: int = 1):
    """Decoded sub-batches of plan indices offset, offset + stride, ... (`count` of them),
    `per_block` per block. `plan_index_rows` generates the rows lazily, nothing is stored."""
    import ray.data

    # The read asks for what the decoder does, and the decoder takes whole blocks: then Ray Data
    # fuses the two, and the decode actors make the rows themselves.
    rows = plan_index_rows(count, max(1, count // per_block), num_cpus=config.data.decode_cpus)
    return rows.map_batches(  # a finished run rerun: no rows
        TrainBatchDecoder,
        fn_constructor_kwargs={**decoder_args, "index_offset": offset, "index_stride": stride},
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=config.data.decode_actors),
        num_cpus=config.data.decode_cpus,
    )


def check_training_split(config, labels: np.ndarray) -> np.ndarray:
    """Refuse a sampler or index the training split cannot serve (ValueError naming the
    setting); returns the seen-class hold-out ids. Needs only the split's labels in id order,
    so the driver runs it before Ray starts (`pipeline.training.driver.preflight`)."""
    holdout = seen_holdout_ids(labels, config.data.seen_holdout_fraction, config.train.seed)
    if config.sampler.name == "neighbourhoods":
        check_neighbourhoods_fit(config, labels, holdout)
    if config.sampler.name == "hard_pools":
        check_pool_index_fits(config, len(labels) - len(holdout))
    # The planners check the batch against the split (classes per batch, examples); they only
    # reach the refresh actor when they plan, so building one here starts nothing.
    build_planner(config, labels, holdout)
    return holdout


def check_neighbourhoods_fit(config, labels: np.ndarray, holdout: np.ndarray) -> None:
    """Refuse, before training starts, a Magnet setup whose neighbourhoods cannot be formed:
    every seed needs M - 1 clusters of other classes. A class of n examples gets min(K, n)
    clusters, so the class with the most clusters bounds what is left for the others."""
    magnet = config.loss.magnet
    kept = np.ones(len(labels), dtype=bool)
    kept[holdout] = False
    sizes = np.bincount(labels[kept])
    clusters = np.minimum(sizes[sizes > 0], magnet.clusters_per_class)
    others = int(clusters.sum() - clusters.max())
    if others < magnet.clusters_per_neighbourhood - 1:
        from pipeline.config import ConfigError

        raise ConfigError(
            f"loss.magnet.clusters_per_neighbourhood: {magnet.clusters_per_neighbourhood} clusters per "
            f"neighbourhood need {magnet.clusters_per_neighbourhood - 1} impostor clusters of other classes, "
            f"but the training split yields at most {others} (K={magnet.clusters_per_class}, "
            f"{len(clusters)} classes)"
        )


def check_pool_index_fits(config, num_pooled: int) -> None:
    """Refuse, before training starts, a `refresh.pool_index` that cannot be trained on the
    training split (an IVF index needs at least one image per list), rather than fail the
    first refresh."""
    from pipeline.refresh.hard_pools import check_index_trains

    check_index_trains(config.model.embedding_dim, config.refresh.pool_index, num_pooled,
                       "refresh.pool_index", f"the training split's {num_pooled} pooled images")
