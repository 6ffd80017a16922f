"""Losses by name: `build_loss(config.loss, num_classes, embedding_dim)`.

Each loss lives in its own module and follows `pipeline.losses.base.MetricLoss`.
"""

from __future__ import annotations

import inspect

from pipeline.losses.base import LossOutput, MetricLoss
from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.magnet import MagnetLoss
from pipeline.losses.multi_similarity import MultiSimilarityLoss
from pipeline.losses.normalized_softmax import NormalizedSoftmaxLoss
from pipeline.losses.pddm import PDDMLoss
from pipeline.losses.proxy_anchor import ProxyAnchorLoss
from pipeline.losses.softtriple import SoftTripleLoss
from pipeline.losses.triplet import TripletMarginLoss

LOSSES: dict[str, type[MetricLoss]] = {
    "triplet": TripletMarginLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "contrastive": ContrastiveLoss,
    "multi_similarity": MultiSimilarityLoss,
    "softtriple": SoftTripleLoss,
    "pddm": PDDMLoss,
    "proxy_anchor": ProxyAnchorLoss,
    "magnet": MagnetLoss,
}


def batch_requirement(name: str) -> str:
    """What the batch planner must deliver for loss `name` (see MetricLoss.batch_requirement)."""
    return LOSSES[name].batch_requirement


def build_loss(loss_config, num_classes: int, embedding_dim: int) -> MetricLoss:
    """Instantiate the configured loss with its section's parameters.

    A section may hold settings that belong to the loss's sampler or index (Magnet's M, D, K);
    only those the loss's constructor takes are passed to it.
    """
    cls = LOSSES[loss_config.name]
    accepted = inspect.signature(cls).parameters
    params = {k: v for k, v in vars(getattr(loss_config, loss_config.name)).items() if k in accepted}
    # Learned parameters (proxies, centers, the PDDM unit) are sized by the data and model.
    for key, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
        if key in accepted:
            params[key] = value
    return cls(**params)


__all__ = ["LOSSES", "LossOutput", "MetricLoss", "batch_requirement", "build_loss"]
