"""Multi-similarity loss with its own pair mining (Wang et al., CVPR 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import LossOutput, MetricLoss
from pipeline.losses.pair_masks import masked_log1p_sum_exp, masked_mean, pair_masks


class MultiSimilarityLoss(MetricLoss):
    """Multi-similarity loss on cosine similarities S of the L2-normalised embeddings.

    Mining, per anchor a, against its un-mined pairs: keep negatives with
    `S_an > min_p S_ap - epsilon` and positives with `S_ap < max_n S_an + epsilon`. Then

        l(a) = 1/alpha log(1 + sum_p exp(-alpha (S_ap - base)))
             + 1/beta  log(1 + sum_n exp( beta (S_an - base)))

    over the kept pairs. Both kept sets are empty exactly when `min S_ap >= max S_an + epsilon`
    (the hardest pair of each kind passes the same test), and such an anchor contributes 0.
    Loss = mean of l over *all* N anchors, as in the authors' code (sum / batch size).
    Positives are same-label pairs i != j; the authors' code drops them by `S < 1 - 1e-5`, which
    would also drop exact duplicates. `per_example` is l(a); `stats` holds the fraction of
    anchors with mined pairs and the kept fractions of positive and negative pairs.
    """

    batch_requirement = "m_per_class"

    def __init__(
        self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1
    ):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.epsilon = epsilon

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        x = F.normalize(embeddings, dim=1)
        sim = x @ x.T
        positive, negative = pair_masks(labels)
        # Mining thresholds come from the un-mined pairs and are not differentiated through.
        with torch.no_grad():
            hardest_positive = torch.where(positive, sim, torch.inf).amin(dim=1, keepdim=True)
            hardest_negative = torch.where(negative, sim, -torch.inf).amax(dim=1, keepdim=True)
            kept_negative = negative & (sim > hardest_positive - self.epsilon)
            kept_positive = positive & (sim < hardest_negative + self.epsilon)
        pos_term = masked_log1p_sum_exp(-self.alpha * (sim - self.base), kept_positive, dim=1)
        neg_term = masked_log1p_sum_exp(self.beta * (sim - self.base), kept_negative, dim=1)
        per_example = pos_term / self.alpha + neg_term / self.beta
        mined_anchor = kept_positive.any(dim=1) & kept_negative.any(dim=1)
        return LossOutput(
            loss=per_example.mean(),
            per_example=per_example.detach(),
            stats={
                "mined_anchor_fraction": mined_anchor.to(sim.dtype).mean(),
                "kept_positive_fraction": masked_mean(kept_positive, positive),
                "kept_negative_fraction": masked_mean(kept_negative, negative),
            },
        )
