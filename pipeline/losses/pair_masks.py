"""Pair masks, pairwise distances and masked means shared by the pair- and triplet-based losses.

Every pair-based baseline (triplet, contrastive, multi-similarity) builds its pairs here, so the
definition of "positive", "negative" and "distance" is the same across them.
"""

from __future__ import annotations

import torch

DISTANCES = ("euclidean", "squared")
"""Names accepted by `pairwise_distances`."""


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [N, N] masks: positives (same label, i != j) and negatives (different label)."""
    same = labels[:, None] == labels[None, :]
    self_pair = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~self_pair, ~same


def check_distance(distance: str) -> str:
    """Return `distance` if it is one of `DISTANCES`; constructors call this to fail early."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return distance


def pairwise_distances(embeddings: torch.Tensor, distance: str) -> torch.Tensor:
    """[N, N] Euclidean or squared Euclidean distances, with a zero diagonal and finite gradients.

    Uses the Gram-matrix form (no [N, N, D] difference tensor). The square root has an infinite
    derivative at 0, which would turn into NaN (0 * inf) even for pairs a loss masks out, so
    coincident points get distance 0 with gradient 0 (the subgradient `torch.norm` also uses).
    """
    gram = embeddings @ embeddings.T
    sq_norms = gram.diagonal()
    squared = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    # Rounding leaves ~1e-16 (float64) or ~1e-7 (float32) on the diagonal; it must be exactly 0.
    self_pair = torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    squared = squared.masked_fill(self_pair, 0.0)
    if distance == "squared":
        return squared
    nonzero = squared > 0
    return torch.where(nonzero, torch.where(nonzero, squared, 1.0).sqrt(), 0.0)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of `values` where `mask` holds (over `dim`, or all of it); 0 where nothing is selected.

    The result stays attached to the graph of `values` even when the mask is empty, so an empty
    batch still gives a zero loss that backward (and DDP's gradient hooks) can run through.
    Masked-out entries may be +-inf: `torch.where` keeps them out of both value and gradient.
    """
    selected = torch.where(mask, values, 0.0)
    if dim is None:
        return selected.sum() / mask.sum().clamp_min(1)
    return selected.sum(dim) / mask.sum(dim).clamp_min(1)


def masked_log1p_sum_exp(exponents: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """`log(1 + sum exp(exponents))` over the masked entries along `dim`, computed stably.

    The "1 +" is a zero logit placed in front, so an empty mask gives exactly 0 with finite
    gradients (a plain `logsumexp` over only -inf would give NaN gradients).
    """
    masked = torch.where(mask, exponents, -torch.inf)
    zero_shape = list(masked.shape)
    zero_shape[dim] = 1
    return torch.logsumexp(torch.cat([masked.new_zeros(zero_shape), masked], dim=dim), dim=dim)
