"""The module DDP wraps: embedding network plus loss, so learned loss parameters are synchronised.

Its forward embeds the local sub-batch, gathers the global batch from all ranks and applies
the loss to it; see `pipeline.distributed` for why the gradients come out equal to one process.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipeline.distributed import gather_tensor, gather_with_local_grad
from pipeline.losses.base import LossOutput, MetricLoss


class MetricLearner(nn.Module):
    """Embedding network and loss in one module (the unit DDP wraps and checkpoints save)."""

    def __init__(self, embedder: nn.Module, loss: MetricLoss, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.embedder = embedder
        self.loss = loss
        self.autocast_dtype = autocast_dtype

    def forward(self, images: torch.Tensor, labels: torch.Tensor, **extras: torch.Tensor):
        """The LossOutput over the global batch (every rank's sub-batch)."""
        if self.autocast_dtype is not None:
            ctx = torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            local = self.embedder(images)
        # The loss runs in at least float32 whatever the backbone's (autocast) precision.
        local = local.to(torch.promote_types(local.dtype, torch.float32))
        embeddings = gather_with_local_grad(local)
        gathered = {name: gather_tensor(value) for name, value in extras.items()}
        out: LossOutput = self.loss(embeddings, gather_tensor(labels), **gathered)
        return out
