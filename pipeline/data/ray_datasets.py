"""The Ray Data graphs that feed training and evaluation.

Training: a dataset of *plan indices* (one row per sub-batch of the whole run, every epoch
included) mapped by `TrainBatchDecoder` actors into decoded sub-batches; Ray Train's
`streaming_split(equal=True)` hands each rank the same number of them. Evaluation: the test
split's shards read and decoded by stateless tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.decoding import EncodedImageStore, TrainBatchDecoder, decode_eval_batch
from pipeline.data.format import shard_uris
from pipeline.data.planning import build_planner

# Light CPU reservations for Data's tasks: on a 2-core machine the Train workers hold most of
# the CPUs, and a read task asking for a whole CPU would wait forever.
READ_CPUS = 0.25
EVAL_DECODE_CPUS = 0.25


@dataclass
class TrainingData:
    """Everything the driver builds about the data before the workers start."""

    train: object
    """Ray Dataset of decoded sub-batches (one row each)."""
    test: object
    """Ray Dataset of decoded test images."""
    num_train_classes: int
    num_train_examples: int
    steps_per_epoch: int
    total_steps: int


def steps_per_epoch(config, num_examples: int) -> int:
    """Configured steps per epoch, or one pass over the training images."""
    return config.train.steps_per_epoch or max(1, num_examples // config.global_batch_size)


def build_training_data(config, root: str) -> TrainingData:
    """Read the splits with Ray Data and build the planned training stream and the eval stream."""
    import ray.data

    train_read = ray.data.read_parquet(
        shard_uris(root, config.data.train_split), num_cpus=READ_CPUS
    ).select_columns(["id", "label", "image"])
    store = EncodedImageStore.from_dataset(train_read)
    planner = build_planner(config.sampler, store.labels, config.train.seed)
    per_epoch = steps_per_epoch(config, len(store))
    total = per_epoch * config.train.epochs
    num_sub_batches = total * config.train.num_workers
    # Several small blocks so several decode actors can work at once.
    chunks = np.array_split(np.arange(num_sub_batches, dtype=np.int64), max(1, num_sub_batches // 8))
    train = ray.data.from_numpy(chunks).rename_columns({"data": "id"}).map_batches(
        TrainBatchDecoder,
        fn_constructor_kwargs={
            "planner": planner,
            "store": store,
            "image_size": config.data.image_size,
            "crop_scale_min": config.data.crop_scale_min,
            "seed": config.train.seed,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.data.decode_actors),
        num_cpus=config.data.decode_cpus,
    )
    test = ray.data.read_parquet(
        shard_uris(root, config.data.test_split), num_cpus=READ_CPUS
    ).select_columns(["id", "label", "image"]).map_batches(
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
    )
