"""Settings of the tests' short training runs on Ray: tiny crops and batches, a few steps,
no restarts. Tests add their own dataset, storage and run length on top (later wins)."""

from __future__ import annotations

SHORT_RUN = [
    "data.image_size=24",
    "data.eval_resize=28",
    "sampler.classes_per_batch=4",
    "sampler.samples_per_class=3",
    "train.epochs=2",
    "train.steps_per_epoch=4",
    "train.log_every_steps=2",
    "train.max_failures=0",
    "eval.batch_size=64",
]
"""2 epochs of 4 steps, sub-batches of 4 classes x 3 images, 24 px crops."""

TINY_BUILT_IN = [
    "data.synthetic.num_classes=24",
    "data.synthetic.images_per_class=12",
    "data.synthetic.image_size=32",
]
"""A built-in dataset of 24 classes x 12 images of 32 px (12 unseen test classes)."""

SHORT_MAGNET = [
    "data.synthetic.num_classes=24",
    "data.synthetic.images_per_class=16",
    "data.synthetic.image_size=32",
    "data.image_size=24",
    "data.eval_resize=28",
    "data.seen_holdout_fraction=0.2",
    "loss.magnet.clusters_per_class=2",
    "loss.magnet.clusters_per_neighbourhood=4",
    "loss.magnet.examples_per_cluster=3",
    "train.log_every_steps=1",
    "train.max_failures=0",
    "data.prefetch_batches=2",
    "refresh.max_plan_ahead_steps=4",
    "eval.batch_size=64",
]
"""On top of the `magnet` preset: 24 classes x 16 images of 32 px, neighbourhoods of 4 clusters
x 3 images, a planner at most 4 steps ahead; the tests add the run length and refresh period."""
