"""Triplet margin loss with in-batch mining (batch-hard, semi-hard or all triplets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import LossOutput, MetricLoss
from pipeline.losses.pair_masks import check_distance, masked_mean, pair_masks, pairwise_distances

MINING = ("batch_hard", "semi_hard", "all")


class TripletMarginLoss(MetricLoss):
    """`max(0, d(a, p) - d(a, n) + margin)` on L2-normalised embeddings, triplets mined in-batch.

    The embeddings are normalised here (idempotent on the model's output) because the margin is
    only meaningful on the unit sphere. Mining, all over the global batch:

    - "batch_hard" (Hermans et al. 2017): per anchor, the farthest positive and the nearest
      negative; loss = mean over anchors that have both a positive and a negative.
    - "semi_hard" (Schroff et al. 2015, FaceNet): per (anchor, positive) pair, the nearest
      negative that is strictly farther than the positive. When no such negative exists we fall
      back to the *hardest* (nearest) negative, so every pair still gets a gradient towards a
      correct ordering (TensorFlow Addons falls back to the farthest negative instead).
      Loss = mean over valid (anchor, positive) pairs. Builds an [N, N, N] mask.
    - "all": every valid triplet; loss = mean over *active* triplets (loss > 0), as in
      pytorch-metric-learning's `AvgNonZeroReducer`, so easy triplets do not dilute the gradient
      as training progresses. Memory is O(N^3) floats.

    `per_example[i]` is anchor i's loss (batch-hard), or the mean over all its valid pairs or
    triplets (semi-hard, all; inactive ones count as 0); anchors with no positive or no negative
    get 0. `stats["active_triplet_fraction"]` is the fraction of the mined triplets with loss > 0.
    Without any valid triplet the loss is a zero that is still attached to the embeddings.
    """

    batch_requirement = "m_per_class"

    def __init__(
        self, margin: float = 0.2, mining: str = "batch_hard", distance: str = "euclidean"
    ):
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
        self.margin = margin
        self.mining = mining
        self.distance = check_distance(distance)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        dist = pairwise_distances(F.normalize(embeddings, dim=1), self.distance)
        positive, negative = pair_masks(labels)
        mine = {"batch_hard": self._batch_hard, "semi_hard": self._semi_hard, "all": self._all}
        loss, per_example, active_fraction = mine[self.mining](dist, positive, negative)
        return LossOutput(
            loss=loss,
            per_example=per_example.detach(),
            stats={"active_triplet_fraction": active_fraction.detach()},
        )

    def _batch_hard(self, dist, positive, negative):
        hardest_positive = torch.where(positive, dist, -torch.inf).amax(dim=1)
        hardest_negative = torch.where(negative, dist, torch.inf).amin(dim=1)
        valid = positive.any(dim=1) & negative.any(dim=1)
        # Invalid anchors give -inf here (never NaN); `valid` keeps them out of value and gradient.
        anchor_loss = F.relu(hardest_positive - hardest_negative + self.margin)
        return (
            masked_mean(anchor_loss, valid),
            torch.where(valid, anchor_loss, 0.0),
            masked_mean(anchor_loss > 0, valid),
        )

    def _semi_hard(self, dist, positive, negative):
        # [a, p, n]: negative n of anchor a lies strictly beyond positive p.
        beyond_positive = negative[:, None, :] & (dist[:, None, :] > dist[:, :, None])
        semi_hard = torch.where(beyond_positive, dist[:, None, :], torch.inf).amin(dim=2)
        hardest = torch.where(negative, dist, torch.inf).amin(dim=1, keepdim=True)
        chosen_negative = torch.where(beyond_positive.any(dim=2), semi_hard, hardest)
        valid = positive & negative.any(dim=1, keepdim=True)
        pair_loss = F.relu(dist - chosen_negative + self.margin)
        return (
            masked_mean(pair_loss, valid),
            masked_mean(pair_loss, valid, dim=1),
            masked_mean(pair_loss > 0, valid),
        )

    def _all(self, dist, positive, negative):
        triplet_loss = F.relu(dist[:, :, None] - dist[:, None, :] + self.margin)  # [a, p, n]
        valid = positive[:, :, None] & negative[:, None, :]
        active = valid & (triplet_loss > 0)
        return (
            masked_mean(triplet_loss, active),
            masked_mean(triplet_loss, valid, dim=(1, 2)),
            masked_mean(active, valid),
        )
