"""SoftTriple loss (Qian, Shang, Sun, Hu, Li, Jin, ICCV 2019): normalised softmax with K centers
per class, so that a class made of several modes (poses, views) need not collapse to one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.base import LossOutput, MetricLoss


class SoftTripleLoss(MetricLoss):
    """Cross entropy on smoothed class similarities over K learned centers per class.

    For a normalised example x and normalised centers w_c^k (stored class-major, row c*K + k):

        S'_{x,c} = sum_k softmax_k(x.w_c^k / gamma) x.w_c^k
        l(x)     = cross_entropy(la * (S'_x - margin * onehot(y)), y)
        R        = sum_c sum_{t<s} sqrt(2 + 1e-5 - 2 w_c^t.w_c^s) / (C K (K - 1))
        loss     = mean l + tau * R          (R is skipped when tau = 0 or K = 1)

    `parameters()` of this module are exactly the centers; the optimizer builder gives them their
    own learning rate (the paper: 1e-2 with Adam while the backbone uses 1e-4). With K = 1 the
    loss is normalised softmax with additive margin `margin` and scale `la`.
    """

    batch_requirement = "any"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
    ):
        """la: logit scale (lambda); gamma: softmax temperature over a class's centers; tau:
        weight of the center-merging regulariser R; margin: additive margin (delta) on the true
        class."""
        super().__init__()
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = gamma
        self.tau = tau
        self.margin = margin
        # Gaussian rows are uniformly distributed directions once normalised; the scale is
        # irrelevant because forward normalises the centers.
        self.centers = nn.Parameter(torch.randn(num_classes * centers_per_class, embedding_dim))

    def class_similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """S' [N, C]: each class's similarity, a softmax(1/gamma)-weighted mean over its centers."""
        # Compute in the wider of the two dtypes: float32 embeddings (EmbeddingNet's, under
        # autocast too) meet float32 centers, and float64 reference tests stay in float64.
        dtype = torch.promote_types(embeddings.dtype, self.centers.dtype)
        x = F.normalize(embeddings.to(dtype), dim=1)
        similarity = (x @ self._normalised_centers(dtype).T).view(
            x.shape[0], self.num_classes, self.centers_per_class
        )
        center_weights = torch.softmax(similarity / self.gamma, dim=2)
        return (center_weights * similarity).sum(dim=2)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        """embeddings [N, D] (normalised here), labels [N] long in [0, num_classes)."""
        class_similarity = self.class_similarities(embeddings)
        margins = self.margin * F.one_hot(labels, self.num_classes).to(class_similarity.dtype)
        per_example = F.cross_entropy(
            self.la * (class_similarity - margins), labels, reduction="none"
        )
        cross_entropy = per_example.mean()

        if self.tau > 0 and self.centers_per_class > 1:
            regulariser = self.center_regulariser(class_similarity.dtype)
            loss = cross_entropy + self.tau * regulariser
        else:
            regulariser = class_similarity.new_zeros(())
            loss = cross_entropy

        return LossOutput(
            loss=loss,
            per_example=per_example.detach(),
            stats={
                "cross_entropy": cross_entropy.detach(),
                "R": regulariser.detach(),
            },
        )

    def center_regulariser(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """R: the mean over pairs t < s of a class's centers of their (smoothed) distance."""
        num_centers = self.centers_per_class
        per_class = self._normalised_centers(dtype).view(self.num_classes, num_centers, -1)
        gram = per_class @ per_class.transpose(1, 2)  # [C, K, K]
        t, s = torch.triu_indices(num_centers, num_centers, offset=1, device=gram.device)
        # The 1e-5 keeps sqrt differentiable when two centers coincide (the paper's constant).
        distances = torch.sqrt(2.0 + 1e-5 - 2.0 * gram[:, t, s])
        return distances.sum() / (self.num_classes * num_centers * (num_centers - 1))

    def _normalised_centers(self, dtype: torch.dtype) -> torch.Tensor:
        return F.normalize(self.centers.to(dtype), dim=1)
