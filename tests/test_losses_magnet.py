"""Magnet loss and its nearest-cluster classifier against methods.md section 1 and float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.magnet import (
    MagnetLoss,
    _batch_clusters,
    magnet_class_predictions,
    magnet_class_scores,
)

F64 = torch.float64


def _check_batch(dtype=F64):
    """methods.md check batch: cluster A (class 0) = (0,0),(0,2); cluster B (class 1) = (1,0),(1,2)."""
    embeddings = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 0.0], [1.0, 2.0]], dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1])
    clusters = torch.tensor([17, 17, 42, 42])  # global ids: arbitrary, only grouping matters
    return embeddings, labels, clusters


def _reference_magnet(embeddings, labels, clusters, alpha):
    """Plain float64 loop over examples and clusters: (per-example losses, sigma2)."""
    r = embeddings.detach().to(F64).tolist()
    labels, clusters = labels.tolist(), clusters.tolist()
    n, dim = len(r), len(r[0])
    ids = sorted(set(clusters))
    means, cls = {}, {}
    for m in ids:
        members = [i for i in range(n) if clusters[i] == m]
        means[m] = [sum(r[i][d] for i in members) / len(members) for d in range(dim)]
        cls[m] = labels[members[0]]

    def sq(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))

    sigma2 = sum(sq(r[i], means[clusters[i]]) for i in range(n)) / (n - 1)
    losses = []
    for i in range(n):
        own = sq(r[i], means[clusters[i]]) / (2 * sigma2)
        others = [-sq(r[i], means[m]) / (2 * sigma2) for m in ids if cls[m] != labels[i]]
        if not others:
            losses.append(0.0)
            continue
        top = max(others)
        lse = top + math.log(sum(math.exp(o - top) for o in others))
        losses.append(max(0.0, own + alpha + lse))
    return losses, sigma2


def _random_neighbourhood(seed, dtype=F64, dim=5):
    """4 clusters x 3 examples; clusters 10 and 11 share class 2, so same-class exclusion matters."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(12, dim, generator=g, dtype=dtype)
    clusters = torch.tensor([10, 10, 10, 11, 11, 11, 30, 30, 30, 5, 5, 5])
    labels = torch.tensor([2, 2, 2, 2, 2, 2, 0, 0, 0, 7, 7, 7])
    perm = torch.randperm(12, generator=g)  # members need not be contiguous
    return embeddings, labels[perm], clusters[perm]


def test_check_values_alpha_1():
    out = MagnetLoss(alpha=1.0)(*_check_batch()[:2], clusters=_check_batch()[2])
    assert out.stats["sigma2"] == pytest.approx(4 / 3, abs=1e-12)
    torch.testing.assert_close(
        out.per_example, torch.full((4,), 0.625, dtype=F64), rtol=0, atol=1e-12
    )
    assert out.loss.item() == pytest.approx(0.625, abs=1e-12)
    assert out.loss.item() != pytest.approx(0.71875, abs=1e-3)  # the 2 sigma^4 pitfall
    assert out.stats["active_fraction"] == 1.0
    assert not out.per_example.requires_grad


def test_check_values_alpha_quarter_is_zero():
    embeddings, labels, clusters = _check_batch()
    out = MagnetLoss(alpha=0.25)(embeddings, labels, clusters=clusters)
    assert out.loss.item() == 0.0
    assert out.stats["active_fraction"] == 0.0


def test_check_values_float32():
    embeddings, labels, clusters = _check_batch(torch.float32)
    out = MagnetLoss()(embeddings, labels, clusters=clusters)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(0.625, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_matches_float64_loop(seed, alpha):
    embeddings, labels, clusters = _random_neighbourhood(seed)
    out = MagnetLoss(alpha=alpha)(embeddings, labels, clusters=clusters)
    expected, sigma2 = _reference_magnet(embeddings, labels, clusters, alpha)
    torch.testing.assert_close(
        out.per_example, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-10
    )
    assert out.stats["sigma2"] == pytest.approx(sigma2, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-10)
    out32 = MagnetLoss(alpha=alpha)(embeddings.float(), labels, clusters=clusters)
    assert out32.loss.item() == pytest.approx(out.loss.item(), abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_several_neighbourhoods_sharing_clusters_match_the_float64_loop(seed):
    """Batches as several neighbourhoods make them: a cluster drawn by two neighbourhoods is one
    cluster of the batch, with both draws' members; ids are sparse and in no order."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10_000, (6,), generator=g)
    classes = torch.tensor([3, 3, 8, 1, 8, 5])
    draws = torch.cat([torch.randperm(6, generator=g)[:4] for _ in range(3)])  # 3 x 4 clusters
    clusters = ids[draws].repeat_interleave(3)  # D = 3
    labels = classes[draws].repeat_interleave(3)
    embeddings = torch.randn(len(clusters), 4, generator=g, dtype=F64)
    out = MagnetLoss(alpha=2.0)(embeddings, labels, clusters=clusters)
    expected, sigma2 = _reference_magnet(embeddings, labels, clusters, 2.0)
    torch.testing.assert_close(out.per_example, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-10)
    assert out.stats["sigma2"] == pytest.approx(sigma2, abs=1e-12)


@pytest.mark.parametrize("clusters", [[5, 5, 5], [9, 2, 9, 7, 2, 40], [3, 1, 2, 0], [0, 10**12, 0, 10**12]])
def test_batch_slots_number_the_clusters_as_torch_unique_does(clusters):
    clusters = torch.tensor(clusters)
    ids, inverse = torch.unique(clusters, return_inverse=True)
    cluster_of, present = _batch_clusters(clusters)
    assert cluster_of.tolist() == inverse.tolist()
    assert present.tolist() == [slot < len(ids) for slot in range(len(clusters))]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_two_clusters_of_two_is_a_triplet_hinge(seed):
    """M = D = 2: l(r) = max(0, (||r - mu_own||^2 - ||r - mu_other||^2) / (2 sigma2) + alpha)."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, 3, generator=g, dtype=F64)
    labels = torch.tensor([0, 0, 1, 1])
    clusters = torch.tensor([0, 0, 1, 1])
    alpha = 0.5
    out = MagnetLoss(alpha=alpha)(embeddings, labels, clusters=clusters)

    means = torch.stack([embeddings[:2].mean(0), embeddings[2:].mean(0)])
    own = (embeddings - means[clusters]).pow(2).sum(1)
    other = (embeddings - means[1 - clusters]).pow(2).sum(1)
    sigma2 = own.sum() / 3
    triplet = torch.relu((own - other) / (2 * sigma2) + alpha)
    torch.testing.assert_close(out.per_example, triplet, rtol=0, atol=1e-12)


def test_gradcheck():
    """Finite differences move the cluster means and sigma2 too: this checks that gradient
    flows through both batch statistics."""
    embeddings, labels, clusters = _random_neighbourhood(4, dim=3)
    embeddings.requires_grad_(True)
    loss = MagnetLoss(alpha=4.0)  # large alpha: every hinge active, away from its kink
    assert torch.autograd.gradcheck(
        lambda e: loss(e, labels, clusters=clusters).loss, (embeddings,), eps=1e-6, atol=1e-6
    )


def test_no_other_class_gives_zero_attached_loss():
    embeddings = torch.randn(6, 3, dtype=F64, requires_grad=True)
    labels = torch.zeros(6, dtype=torch.long)
    clusters = torch.tensor([0, 0, 0, 1, 1, 1])
    out = MagnetLoss()(embeddings, labels, clusters=clusters)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_zero_variance_is_finite():
    """One example per cluster: every r equals its mean, sigma2 = 0 is floored, no NaN."""
    embeddings = torch.randn(4, 3, dtype=F64, requires_grad=True)
    out = MagnetLoss()(embeddings, torch.tensor([0, 1, 2, 3]), clusters=torch.arange(4))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(embeddings.grad).all()


def test_cluster_with_mixed_labels_is_rejected():
    embeddings, labels, clusters = _check_batch()
    with pytest.raises(ValueError, match="class label"):
        MagnetLoss()(embeddings, torch.tensor([0, 1, 1, 1]), clusters=clusters)


def test_running_sigma2_updates_in_training_only():
    loss = MagnetLoss(sigma2_momentum=0.5)
    embeddings, labels, clusters = _check_batch()
    loss(embeddings, labels, clusters=clusters)
    assert loss.running_sigma2.item() == pytest.approx(4 / 3, abs=1e-6)  # first batch: outright
    loss(2 * embeddings, labels, clusters=clusters)  # sigma2 = 16/3
    assert loss.running_sigma2.item() == pytest.approx(0.5 * 4 / 3 + 0.5 * 16 / 3, abs=1e-6)
    loss.eval()
    loss(10 * embeddings, labels, clusters=clusters)
    assert loss.running_sigma2.item() == pytest.approx(10 / 3, abs=1e-6)
    assert "running_sigma2" in loss.state_dict()


def test_class_scores_check_values():
    centroids = torch.tensor([[0.0, 0.0], [0.0, 3.0], [2.0, 0.0]], dtype=F64)
    probabilities = magnet_class_scores(
        torch.tensor([[1.1, 0.0]], dtype=F64), centroids, torch.tensor([0, 0, 1]), 1.0, 2, L=3
    )
    torch.testing.assert_close(
        probabilities, torch.tensor([[0.452902, 0.547098]], dtype=F64), rtol=0, atol=1e-6
    )
    assert probabilities.argmax(1).item() == 1


def _reference_class_scores(queries, centroids, classes, sigma2, num_classes, L):
    result = []
    for q in queries.tolist():
        d = [sum((a - b) ** 2 for a, b in zip(q, c, strict=True)) for c in centroids.tolist()]
        nearest = sorted(range(len(d)), key=lambda i: d[i])[:L]
        scores = [0.0] * num_classes
        for i in nearest:
            scores[classes[i]] += math.exp(-d[i] / (2 * sigma2))
        result.append([s / sum(scores) for s in scores])
    return torch.tensor(result, dtype=F64)


@pytest.mark.parametrize("L", [1, 4, 50])
def test_class_scores_match_loop_and_chunking(L):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(9, 4, generator=g, dtype=F64)
    centroids = torch.randn(12, 4, generator=g, dtype=F64)
    classes = torch.randint(0, 5, (12,), generator=g)
    expected = _reference_class_scores(queries, centroids, classes.tolist(), 0.7, 5, L)
    whole = magnet_class_scores(queries, centroids, classes, 0.7, 5, L=L)
    chunked = magnet_class_scores(
        queries, centroids, classes, torch.tensor(0.7, dtype=F64), 5, L=L, chunk_size=2
    )
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    # The chunked argmax the refresh actor's seen-class accuracy uses (no Q x C matrix).
    predicted = magnet_class_predictions(queries, centroids, classes, 0.7, 5, L=L, chunk_size=2)
    torch.testing.assert_close(predicted, expected.argmax(1), rtol=0, atol=0)


def test_class_scores_stable_for_far_queries():
    """exp(-d / 2 sigma2) underflows to 0 for every centroid; the vote must still be defined."""
    centroids = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    probabilities = magnet_class_scores(
        torch.tensor([[1000.0, 0.0]]), centroids, torch.tensor([0, 0, 1]), 1e-3, 2, L=3
    )
    assert torch.isfinite(probabilities).all()
    assert probabilities.argmax(1).item() == 1
    assert probabilities.sum().item() == pytest.approx(1.0)
