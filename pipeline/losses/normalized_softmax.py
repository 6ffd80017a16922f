"""Normalised softmax: cross entropy over cosine similarities to one learnable proxy per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.base import LossOutput, MetricLoss


class NormalizedSoftmaxLoss(MetricLoss):
    """Zhai & Wu 2019, "Classification is a Strong Baseline for Deep Metric Learning".

    logits = (cos(x, W_c) - margin * [c == y]) / temperature, loss = mean cross entropy.
    Embeddings and proxies are both normalised here: the formula is on cosines. `margin` > 0
    is the CosFace additive margin; with margin = delta and temperature = 1 / lambda this is
    SoftTriple with K = 1. `per_example` is each example's cross entropy;
    `stats["proxy_accuracy"]` is the fraction whose nearest proxy is its own class.
    """

    batch_requirement = "any"

    def __init__(
        self, num_classes: int, embedding_dim: int, temperature: float = 0.05, margin: float = 0.0
    ):
        super().__init__()
        self.temperature = temperature
        self.margin = margin
        # Normal init is isotropic, so the normalised proxies start uniform on the sphere.
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        # Promote rather than cast to one side: float64 embeddings must not be rounded to the
        # float32 proxies, and half-precision embeddings are lifted to the proxies' precision.
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        x = F.normalize(embeddings.to(dtype), dim=1)
        proxies = F.normalize(self.proxies.to(dtype), dim=1)
        cosine = x @ proxies.T
        true_class = F.one_hot(labels, num_classes=proxies.shape[0]).to(dtype)
        logits = (cosine - self.margin * true_class) / self.temperature
        per_example = F.cross_entropy(logits, labels, reduction="none")
        accuracy = (cosine.argmax(dim=1) == labels).to(dtype).mean()
        return LossOutput(
            loss=per_example.mean(),
            per_example=per_example.detach(),
            stats={"proxy_accuracy": accuracy.detach()},
        )
