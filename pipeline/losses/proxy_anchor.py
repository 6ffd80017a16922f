"""Proxy-anchor loss: each class proxy is an anchor against every example of the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.base import LossOutput, MetricLoss
from pipeline.losses.pair_masks import masked_log1p_sum_exp


class ProxyAnchorLoss(MetricLoss):
    """Kim, Kim, Cho & Kwak, CVPR 2020, on cosines of normalised embeddings and proxies.

        loss = 1/|P+| sum_{p in P+} log(1 + sum_{x of class p}  exp(-alpha (cos(x, p) - margin)))
             + 1/|P|  sum_{p in P}  log(1 + sum_{x not of p}    exp( alpha (cos(x, p) + margin)))

    P+ are the proxies whose class is in the batch. The loss is a sum over proxies, not over
    examples, so `per_example` is None. `stats["positive_proxy_fraction"]` is |P+| / |P|.
    Proxies use the authors' Kaiming-normal (fan_out) initialisation.
    """

    batch_requirement = "any"

    def __init__(
        self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0
    ):
        super().__init__()
        self.margin = margin
        self.alpha = alpha
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        # Promote, as NormalizedSoftmaxLoss does: never round float64 embeddings to the proxies.
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        cosine = (
            F.normalize(embeddings.to(dtype), dim=1) @ F.normalize(self.proxies.to(dtype), dim=1).T
        )
        own_class = F.one_hot(labels, num_classes=cosine.shape[1]).bool()  # [N, C]
        pos_term = masked_log1p_sum_exp(-self.alpha * (cosine - self.margin), own_class, dim=0)
        neg_term = masked_log1p_sum_exp(self.alpha * (cosine + self.margin), ~own_class, dim=0)
        with_positives = own_class.any(dim=0)
        # Proxies without positives give log(1) = 0, so the sum over all of them is the sum over P+.
        loss = pos_term.sum() / with_positives.sum().clamp_min(1) + neg_term.mean()
        return LossOutput(
            loss=loss,
            per_example=None,
            stats={"positive_proxy_fraction": with_positives.to(dtype).mean()},
        )
