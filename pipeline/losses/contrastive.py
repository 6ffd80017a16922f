"""Contrastive loss over all pairs of the batch, with separate positive and negative margins."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import LossOutput, MetricLoss
from pipeline.losses.pair_masks import check_distance, masked_mean, pair_masks, pairwise_distances


class ContrastiveLoss(MetricLoss):
    """Hadsell, Chopra & LeCun 2006, in pytorch-metric-learning's form.

    On L2-normalised embeddings (normalised here), for every ordered pair i != j:
    positives cost `max(0, d - pos_margin)`, negatives `max(0, neg_margin - d)` (no squares,
    unlike the 2006 paper). Loss = mean over *active* positive pairs + mean over *active*
    negative pairs, as PML's `AvgNonZeroReducer` does per sub-loss: pairs already inside their
    margin would otherwise shrink the gradient as training progresses, and averaging the two
    kinds apart keeps the many negatives from drowning the few positives of an M-per-class batch.

    `per_example[i]` is the mean of anchor i's pair losses over all its pairs (inactive ones as
    0). `stats` holds `active_positive_fraction` and `active_negative_fraction`.
    """

    batch_requirement = "m_per_class"

    def __init__(
        self, pos_margin: float = 0.0, neg_margin: float = 0.5, distance: str = "euclidean"
    ):
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.distance = check_distance(distance)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        dist = pairwise_distances(F.normalize(embeddings, dim=1), self.distance)
        positive, negative = pair_masks(labels)
        pos_loss = F.relu(dist - self.pos_margin)
        neg_loss = F.relu(self.neg_margin - dist)
        active_pos = positive & (pos_loss > 0)
        active_neg = negative & (neg_loss > 0)
        loss = masked_mean(pos_loss, active_pos) + masked_mean(neg_loss, active_neg)
        pair_loss = torch.where(positive, pos_loss, neg_loss)
        per_example = masked_mean(pair_loss, positive | negative, dim=1)
        return LossOutput(
            loss=loss,
            per_example=per_example.detach(),
            stats={
                "active_positive_fraction": masked_mean(active_pos, positive),
                "active_negative_fraction": masked_mean(active_neg, negative),
            },
        )
