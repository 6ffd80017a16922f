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
