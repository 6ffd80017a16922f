"""The contract every metric-learning loss follows.

A loss sees the *global* batch (all ranks' embeddings, gathered by the training module) and
nothing about processes: gathering, mining across ranks and gradient scaling live in
`pipeline.distributed`, so each loss is a plain function of its inputs and testable in one
process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    """What a loss returns: the scalar to minimise plus what the samplers and logs need."""

    loss: torch.Tensor
    """Scalar loss (a mean over the batch unless the method says otherwise)."""
    per_example: torch.Tensor | None = None
    """Detached per-example losses, shape [N], for samplers that follow the loss (Magnet)."""
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Scalars worth logging, e.g. the fraction of active triplets: detached 0-d tensors on the
    loss's device, read with `float()` only when logged (reading one every step would make the
    CPU wait for the GPU every step)."""


class MetricLoss(nn.Module):
    """Base class: `forward(embeddings [N, D], labels [N], **extras) -> LossOutput`.

    `extras` carries what a method's batches hold beyond labels (Magnet: `clusters`, the
    cluster id of each example). A loss ignores extras it does not use.
    """

    #: What the batch planner must deliver: "m_per_class", "any" (plain shuffling works),
    #: or "neighbourhoods" (Magnet). Checked when the config is validated.
    batch_requirement: str = "m_per_class"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        raise NotImplementedError
