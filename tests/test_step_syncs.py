"""On a GPU, a training step never makes the CPU wait for the GPU (the loop's data copy, the
loss and its logged statistics, the optimizer). Each such wait drains the GPU's queue, so it
runs idle while the next step is prepared. Skips without CUDA: on a CPU nothing is queued."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.decoding import sub_batch_columns
from pipeline.device_feed import DeviceFeed
from pipeline.learner import MetricLearner
from pipeline.losses import LOSSES, build_loss
from pipeline.models import build_model
from pipeline.training.optim import build_optimizer, build_scheduler

CLASSES, PER_CLASS = 8, 4

def _rows(count: int, image_size: int):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    for _ in range(count):
        yield {
            "images": rng.integers(0, 256, (1, len(labels), 3, image_size, image_size), dtype=np.uint8),
            "labels": labels[None],
            "ids": np.arange(len(labels))[None],
            # Magnet's: two clusters per class, global ids as the cluster index numbers them
            "extra_clusters": (100 + 2 * labels + np.arange(len(labels)) % 2)[None],
        }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU work never waits on a queue)")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_training_step_never_waits_for_the_gpu(name):
    config = load_config("local")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    loss = build_loss(dataclasses.replace(config.loss, name=name), CLASSES, config.model.embedding_dim)
    learner = MetricLearner(build_model(config.model), loss, torch.bfloat16).to(device)
    optimizer = build_optimizer(learner.embedder, learner.loss, config.optim, config.loss.lr)
    scheduler = build_scheduler(optimizer, config.optim, 100)
    feed = DeviceFeed(_rows(4, config.data.image_size), device, sub_batch_columns, channels_last=True)

    def step():
        _, tensors = feed.take()
        out = learner(tensors.pop("images"), tensors.pop("labels"), **tensors)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        feed.prefetch()
        return out

    step()  # the first step allocates (cuBLAS handles, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss.detach()).item()
    assert all(np.isfinite(float(value)) for value in out.stats.values())
