"""PDDM: position-dependent deep metric (Huang, Loy, Tang, NeurIPS 2016).

A small network scores a pair of features from their difference *and* their position (mean), so
similarity can adapt to the local density of the feature space. The loss mines hard quadruplets
with those scores and trains both the unit and the embedding with a double-header hinge.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.base import LossOutput, MetricLoss
from pipeline.losses.pair_masks import masked_mean, pair_masks, pairwise_distances

QuadrupletMode = Literal["hardest", "per_positive_pair"]
QUADRUPLET_MODES = ("hardest", "per_positive_pair")
"""`hardest`: the paper's one quadruplet per batch; `per_positive_pair`: one per positive pair."""

NegativeMode = Literal["hardest", "semi_hard"]
NEGATIVE_MODES = ("hardest", "semi_hard")
"""`hardest`: the paper's negative of highest score; `semi_hard`: the highest score still below
the positive pair's (FaceNet's rule, in score space), the hardest when there is none."""


class PDDMUnit(nn.Module):
    """Similarity score S(fi, fj) of two normalised features (higher = more similar).

        u = |fi - fj|, v = (fi + fj) / 2, each normalised
        u' = relu(Wu u + bu), v' = relu(Wv v + bv), each normalised
        c = relu(Wc [u'; v'] + bc),  S = ws . c + bs

    u and v are symmetric in (fi, fj), so S is too. Every normalisation divides by
    max(norm, eps): u of identical features (and u' or v' whose ReLUs are all off) is the zero
    vector, which then stays zero instead of becoming 0/0 = NaN.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int = 128, eps: float = 1e-12):
        """hidden_dim: width of u', v' and c (ours; the paper does not fix it for all backbones)."""
        super().__init__()
        self.eps = eps
        self.u_layer = nn.Linear(embedding_dim, hidden_dim)  # Wu, bu
        self.v_layer = nn.Linear(embedding_dim, hidden_dim)  # Wv, bv
        self.c_layer = nn.Linear(2 * hidden_dim, hidden_dim)  # Wc, bc
        self.score_layer = nn.Linear(hidden_dim, 1)  # ws, bs

    def score(self, fi: torch.Tensor, fj: torch.Tensor) -> torch.Tensor:
        """Scores [...] of the pairs (fi[...], fj[...]); fi, fj [..., D] normalised."""
        u = F.normalize((fi - fj).abs(), dim=-1, eps=self.eps)
        v = F.normalize((fi + fj) / 2.0, dim=-1, eps=self.eps)
        u_hidden = F.normalize(torch.relu(self.u_layer(u)), dim=-1, eps=self.eps)
        v_hidden = F.normalize(torch.relu(self.v_layer(v)), dim=-1, eps=self.eps)
        joint = torch.relu(self.c_layer(torch.cat([u_hidden, v_hidden], dim=-1)))
        return self.score_layer(joint).squeeze(-1)

    def pairwise_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Scores [N, N] of every pair of a batch of normalised features [N, D], symmetric.

        Builds [N, N, D] inputs by broadcasting (whose backward is a plain sum, deterministic on
        every device) and [N, N, hidden_dim] activations: fine for N up to ~256, beyond that
        memory grows as N^2. Averaging with the transpose makes S_ij == S_ji bitwise whatever
        the matmul kernel does with the two (identical) inputs; it does not change the values.
        """
        scores = self.score(features[:, None, :], features[None, :, :])
        return (scores + scores.T) / 2.0


@torch.no_grad()
def mine_quadruplets(
    scores: torch.Tensor, labels: torch.Tensor, mode: QuadrupletMode = "hardest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard quadruplets (i, j, k, l) from PDDM scores [N, N] and labels [N].

    Returns `pairs`, a boolean [N, N] mask true at the mined positive pairs (i, j) with i < j,
    and `hardest_negative` [N]: k = hardest_negative[i], l = hardest_negative[j], the negative of
    highest score. `hardest` keeps the one positive pair of lowest score (the first in row-major
    order on ties); `per_positive_pair` keeps them all. No negatives in the batch: no pairs.
    """
    if mode not in QUADRUPLET_MODES:
        raise ValueError(f"mode must be one of {QUADRUPLET_MODES}, got {mode!r}")
    positives, negatives = pair_masks(labels)
    pairs = positives.triu(diagonal=1) & negatives.any()
    if mode == "hardest":
        # `& pairs.any()` rather than `if pairs.any()`: with no pair the argmin is a dummy 0 that
        # the mask drops, and the step never waits for the GPU to answer the `if`.
        lowest = scores.masked_fill(~pairs, float("inf")).flatten().argmin()
        pairs = torch.zeros_like(pairs).flatten().index_fill(0, lowest, True).view_as(pairs) & pairs.any()
    hardest_negative = scores.masked_fill(~negatives, float("-inf")).argmax(dim=1)
    return pairs, hardest_negative


@torch.no_grad()
def semi_hard_negatives(
    scores: torch.Tensor, labels: torch.Tensor, hardest_negative: torch.Tensor
) -> torch.Tensor:
    """k [N, N]: for the pair (i, j), the negative of i of highest score S_ik < S_ij, or i's
    hardest negative if every negative scores at least S_ij. j's negative is entry [j, i].

    Why an option: mining by the unit's own highest scores has a degenerate optimum when classes
    overlap (a constant unit makes E_m = 2 alpha, less than any unit whose hardest negatives
    outscore its hardest positives), and the run collapses (benchmarks/README.md). Negatives
    below the positive score keep a gradient that widens the gap instead. Costs [N, N, N].
    """
    _, negatives = pair_masks(labels)
    below = negatives[:, None, :] & (scores[:, None, :] < scores[:, :, None])  # [i, j, k]
    candidate = scores[:, None, :].masked_fill(~below, float("-inf")).argmax(dim=2)
    return torch.where(below.any(dim=2), candidate, hardest_negative[:, None])


class PDDMLoss(MetricLoss):
    """Double-header hinge on PDDM-mined hard quadruplets; owns the PDDM unit it trains.

        E_m = max(0, alpha + S_ik - S_ij) + max(0, alpha + S_jl - S_ij)
        E_e = max(0, beta + D(fi,fj) - D(fi,fk)) + max(0, beta + D(fi,fj) - D(fj,fl))
        E   = E_m + lam * E_e

    with D the squared Euclidean distance of the normalised embeddings, averaged over the mined
    quadruplets. Weight decay is the optimizer's. `parameters()` are the unit's.
    Mining picks indices without gradient; the loss is differentiable in the scores and
    distances at those indices, hence in the embeddings and the unit.
    """

    batch_requirement = "m_per_class"

    def __init__(
        self,
        embedding_dim: int,
        hidden_dim: int = 128,
        alpha: float = 0.5,
        beta: float = 1.0,
        lam: float = 0.5,
        quadruplets: QuadrupletMode = "hardest",
        negatives: NegativeMode = "hardest",
    ):
        """alpha: margin on scores; beta: margin on distances; lam: weight of the embedding
        loss E_e; quadruplets: "hardest" (the paper) or "per_positive_pair"; negatives:
        "hardest" (the paper) or "semi_hard"."""
        super().__init__()
        if quadruplets not in QUADRUPLET_MODES:
            raise ValueError(f"quadruplets must be one of {QUADRUPLET_MODES}, got {quadruplets!r}")
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
        self.unit = PDDMUnit(embedding_dim, hidden_dim)
        self.alpha = alpha
        self.beta = beta
        self.lam = lam
        self.quadruplets = quadruplets
        self.negatives = negatives

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, **extras) -> LossOutput:
        """embeddings [N, D] (normalised here), labels [N] long."""
        features = F.normalize(embeddings, dim=1)
        scores = self.unit.pairwise_scores(features)
        distances = pairwise_distances(features, "squared")
        pairs, hardest_negative = mine_quadruplets(scores, labels, self.quadruplets)

        # Everything below is an [N, N] matrix whose entry (i, j) belongs to the quadruplet of
        # pair (i, j): i's negative k is picked by row [i, j] of `chosen`, j's negative l by row
        # [j, i] (scores are symmetric), so j's side is the transpose of i's. The mask then
        # selects the mined pairs. Values are picked by masks and reductions rather than
        # gathers, whose backward accumulates with atomics on CUDA.
        n = labels.shape[0]
        if self.negatives == "semi_hard":
            chosen = F.one_hot(semi_hard_negatives(scores, labels, hardest_negative), n).bool()
            negative_score = torch.where(chosen, scores[:, None, :], 0.0).sum(dim=2)  # S_ik
            negative_distance = torch.where(chosen, distances[:, None, :], 0.0).sum(dim=2)
        else:  # i's hardest negative does not depend on j
            chosen = F.one_hot(hardest_negative, n).bool()
            negative_score = torch.where(chosen, scores, 0.0).sum(dim=1)[:, None].expand(n, n)
            negative_distance = torch.where(chosen, distances, 0.0).sum(dim=1)[:, None].expand(n, n)

        # Hinge of pair (i, j) against i's negative k, and against j's negative l.
        alpha, beta = self.alpha, self.beta
        metric_loss = torch.relu(alpha + negative_score - scores)
        metric_loss = metric_loss + torch.relu(alpha + negative_score.T - scores)
        embedding_loss = torch.relu(beta + distances - negative_distance)
        embedding_loss = embedding_loss + torch.relu(beta + distances - negative_distance.T)
        # masked_mean is 0 but still attached to the graph when no quadruplet was mined.
        e_m = masked_mean(metric_loss, pairs)
        e_e = masked_mean(embedding_loss, pairs)

        with torch.no_grad():
            mined_negative_scores = (negative_score + negative_score.T) / 2.0
            stats = {
                "E_m": e_m.detach(),
                "E_e": e_e.detach(),
                "positive_score": masked_mean(scores, pairs),
                "negative_score": masked_mean(mined_negative_scores, pairs),
                "quadruplets": pairs.sum(),
            }
        return LossOutput(loss=e_m + self.lam * e_e, stats=stats)
