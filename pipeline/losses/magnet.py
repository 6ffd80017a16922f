"""Magnet loss (Rippel, Paluri, Dollar, Bourdev, ICLR 2016) and its soft nearest-cluster classifier.

The loss models each class as the clusters that the cluster index found in it and penalises
overlap between an example's own cluster and the clusters of *other* classes. Its batches are
neighbourhoods (a seed cluster plus its nearest impostor clusters, D examples each), delivered by
the neighbourhood sampler together with each example's global cluster id (`clusters=`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.base import LossOutput, MetricLoss

_SIGMA2_FLOOR = 1e-12
"""Lower bound on the batch variance. sigma2 is 0 when every cluster of the batch holds one
distinct point (D=1, or an embedding collapsed at initialisation); the floor keeps the loss finite
there instead of dividing by zero. It is far below any variance a real batch has."""

_MIXED_CLUSTER = "every member of a cluster must have the cluster's class label"


class MagnetLoss(MetricLoss):
    """Magnet loss over a neighbourhood batch: a hinge on each example's own-cluster likelihood.

    For an example r of batch cluster m (class c), with mu the batch means of the clusters and
    sigma2 the batch variance around them (divided by N - 1):

        l(r) = max(0, ||r - mu_m||^2 / (2 sigma2) + alpha
                      + log sum_{m': class(m') != c} exp(-||r - mu_m'||^2 / (2 sigma2)))

    and the loss is the mean of l over the batch. Clusters of r's own class other than m appear
    nowhere. Gradient flows through mu and sigma2: both are functions of the batch, as in the
    paper, so moving an example also moves the cluster statistics it contributes to.

    A running mean of sigma2 (an exponential moving average, `running_sigma2`) is kept for
    inference with `magnet_class_scores`; it is updated without gradient in training mode only.
    Every rank sees the same global batch, so every rank's running value is the same.
    """

    batch_requirement = "neighbourhoods"

    running_sigma2: torch.Tensor
    sigma2_updates: torch.Tensor

    def __init__(self, alpha: float = 1.0, sigma2_momentum: float = 0.9):
        """alpha: margin between own-cluster and other-class terms; sigma2_momentum: weight of the
        old value in the running sigma2 (the first training batch sets it outright)."""
        super().__init__()
        if not 0.0 <= sigma2_momentum < 1.0:
            raise ValueError(f"sigma2_momentum must be in [0, 1), got {sigma2_momentum}")
        self.alpha = alpha
        self.sigma2_momentum = sigma2_momentum
        self.register_buffer("running_sigma2", torch.tensor(1.0))
        # Counts updates so that the first batch replaces the placeholder value 1.0 outright.
        self.register_buffer("sigma2_updates", torch.tensor(0, dtype=torch.long))

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, *, clusters: torch.Tensor, **extras
    ) -> LossOutput:
        """embeddings [N, D], labels [N] long, clusters [N] long global cluster ids."""
        n = embeddings.shape[0]
        if n < 2:
            raise ValueError("the Magnet loss needs at least 2 examples (sigma2 divides by N - 1)")

        # Batch-local cluster index of every example, and which of the N slots hold a cluster.
        # The number of clusters M stays on the device: asking for it (torch.unique) would make
        # the CPU wait for the backbone's forward, and the GPU then idles while the loss and the
        # backward are launched. Slots M..N-1 are empty and masked out below.
        cluster_of, present = _batch_clusters(clusters)
        cluster_class = _cluster_classes(cluster_of, labels, present)

        # Cluster means as a membership-matrix product: unlike index_add (atomic adds on CUDA)
        # a matmul sums in a fixed order, so the loss is bitwise reproducible.
        membership = F.one_hot(cluster_of, n).T.to(embeddings.dtype)  # [N slots, N examples]
        means = (membership @ embeddings) / membership.sum(dim=1, keepdim=True).clamp_min(1.0)

        # Own-cluster distances exactly, from the differences ([N, D]); the distances to all
        # slots ([N, N]) in the Gram form, which only the impostor terms read.
        own_sq_dist = (embeddings - means[cluster_of]).pow(2).sum(-1)
        sq_dist = (
            embeddings.pow(2).sum(-1, keepdim=True) + means.pow(2).sum(-1)[None, :] - 2.0 * embeddings @ means.T
        ).clamp_min(0.0)
        sigma2 = (own_sq_dist.sum() / (n - 1)).clamp_min(_SIGMA2_FLOOR)
        scaled = sq_dist / (2.0 * sigma2)  # the paper's 1 / (2 sigma^2), not 1 / (2 sigma^4)

        other_class = (cluster_class[None, :] != labels[:, None]) & present[None, :]  # [N, N slots]
        has_impostor = other_class.any(dim=1)
        logits = (-scaled).masked_fill(~other_class, float("-inf"))
        # A row with no other-class cluster would be all -inf (log-sum-exp -inf, NaN gradient);
        # give it a finite dummy row and zero its loss below, like a batch with no triplet.
        logits = logits.masked_fill(~has_impostor[:, None], 0.0)
        impostor_term = torch.logsumexp(logits, dim=1)

        hinge = torch.relu(own_sq_dist / (2.0 * sigma2) + self.alpha + impostor_term)
        per_example = torch.where(has_impostor, hinge, 0.0)

        if self.training:
            self._update_running_sigma2(sigma2.detach())

        return LossOutput(
            loss=per_example.mean(),
            per_example=per_example.detach(),
            stats={
                "sigma2": sigma2.detach(),
                "running_sigma2": self.running_sigma2.clone(),  # the buffer moves on next step
                "active_fraction": (per_example.detach() > 0).float().mean(),
            },
        )

    @torch.no_grad()
    def _update_running_sigma2(self, sigma2: torch.Tensor) -> None:
        value = sigma2.to(self.running_sigma2.dtype)
        # The first update takes the value as it is. Chosen on the device: asking the CPU
        # whether this is the first (`int(self.sigma2_updates)`) would wait for the GPU.
        first = self.sigma2_updates == 0
        self.running_sigma2.copy_(torch.where(first, value, self.running_sigma2.lerp(value, 1.0 - self.sigma2_momentum)))
        self.sigma2_updates += 1


def _batch_clusters(clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot of each example's cluster [N], which of the N slots hold a cluster [N] bool).

    The slots number the distinct ids in ascending order, as `torch.unique(return_inverse=True)`
    does, but the output sizes are N whatever the number of clusters, so nothing waits for the
    device.
    """
    sorted_ids, order = torch.sort(clusters)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_of_sorted = torch.cumsum(starts, 0) - 1
    cluster_of = torch.empty_like(slot_of_sorted).scatter_(0, order, slot_of_sorted)
    present = torch.arange(clusters.numel(), device=clusters.device) <= slot_of_sorted[-1]
    return cluster_of, present


def _cluster_classes(cluster_of: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Integer class of each slot's cluster, read from its members' labels (which must agree).

    On a GPU a disagreement stops the run with a device-side assertion, which does not make the
    CPU wait (as `F.one_hot` and indexing check their input on CUDA).
    """
    num_slots = present.numel()
    lowest = labels.new_full((num_slots,), torch.iinfo(labels.dtype).max)
    highest = labels.new_full((num_slots,), torch.iinfo(labels.dtype).min)
    lowest = lowest.scatter_reduce(0, cluster_of, labels, reduce="amin")
    highest = highest.scatter_reduce(0, cluster_of, labels, reduce="amax")
    agree = ((lowest == highest) | ~present).all()
    if agree.is_cuda:
        torch._assert_async(agree, _MIXED_CLUSTER)
    elif not agree:
        raise ValueError(_MIXED_CLUSTER)
    return lowest


def magnet_class_scores(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    centroid_classes: torch.Tensor,
    sigma2: float | torch.Tensor,
    num_classes: int,
    L: int = 128,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class probabilities [Q, num_classes] by a soft vote of the L nearest centroids.

    score(c) = sum over the L nearest centroids of class c of exp(-||r - mu||^2 / (2 sigma2)),
    normalised over classes. sigma2 is the loss's `running_sigma2`. Queries are processed
    `chunk_size` at a time, so working memory is about chunk_size x (C + L^2) elements, beside
    the Q x C result (`magnet_class_predictions` keeps only each query's class).
    """
    return torch.cat(list(_class_score_chunks(queries, centroids, centroid_classes, sigma2, num_classes, L,
                                              chunk_size)))


def magnet_class_predictions(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    centroid_classes: torch.Tensor,
    sigma2: float | torch.Tensor,
    num_classes: int,
    L: int = 128,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The class of highest `magnet_class_scores` of each query [Q] (the lowest class on a tie),
    in chunk_size x (C + L^2) memory: 100k queries over 10k classes need no 4 GB score matrix."""
    return torch.cat([
        scores.argmax(1)
        for scores in _class_score_chunks(queries, centroids, centroid_classes, sigma2, num_classes, L, chunk_size)
    ])


def _class_score_chunks(queries, centroids, centroid_classes, sigma2, num_classes: int, L: int, chunk_size: int):
    """`magnet_class_scores`, `chunk_size` queries at a time."""
    num_nearest = min(L, centroids.shape[0])
    centroid_sq_norms = centroids.pow(2).sum(-1)
    for chunk in queries.split(chunk_size):
        sq_dist = (
            chunk.pow(2).sum(-1, keepdim=True)
            + centroid_sq_norms[None, :]
            - 2.0 * chunk @ centroids.T
        ).clamp_min(0.0)
        nearest_sq_dist, nearest = torch.topk(sq_dist, num_nearest, dim=1, largest=False)
        logits = -nearest_sq_dist / (2.0 * sigma2)
        # Subtracting the row maximum before exp: the largest weight becomes 1, so the total is
        # >= 1 and neither overflows nor becomes 0/0 for distant queries or a tiny sigma2.
        weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)  # [q, L]
        nearest_classes = centroid_classes[nearest]
        # Each neighbour's class score as a masked sum over the L neighbours ([q, L, L]), then
        # written into its class column: every write to a column carries the same value, so
        # the result does not depend on write order (scatter_add would, with atomics on CUDA).
        same_class = nearest_classes[:, :, None] == nearest_classes[:, None, :]
        class_score = torch.where(same_class, weights[:, None, :], 0.0).sum(-1)
        probabilities = weights.new_zeros(chunk.shape[0], num_classes).scatter(
            1, nearest_classes, class_score / weights.sum(dim=1, keepdim=True)
        )
        yield probabilities
