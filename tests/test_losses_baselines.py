"""Baseline losses against plain-loop float64 references, hand-computed cases and degenerate batches.

Every reference below is written independently of `pipeline.losses`: explicit loops over anchors,
pairs, triplets or proxies, on scalar tensors so autograd gives the reference gradient too.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.multi_similarity import MultiSimilarityLoss
from pipeline.losses.normalized_softmax import NormalizedSoftmaxLoss
from pipeline.losses.proxy_anchor import ProxyAnchorLoss
from pipeline.losses.triplet import TripletMarginLoss

TOL = {"atol": 1e-10, "rtol": 0.0}

# (batch size, embedding dim, number of label values): from many pairs per class to mostly
# singletons, so anchors without positives appear.
SHAPES = [(6, 3, 2), (8, 4, 3), (12, 5, 4), (16, 8, 5), (7, 3, 7)]
SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# Plain-loop references
# ----------------------------------------------------------------------------------------------


def ref_unit(x):
    return [row / torch.sqrt((row * row).sum()) for row in x]


def ref_distance(u, v, distance):
    squared = ((u - v) ** 2).sum()
    return squared if distance == "squared" else torch.sqrt(squared)


def ref_relu(value):
    return value if value > 0 else value * 0.0


def ref_mean(values):
    return sum(values) / len(values) if values else torch.zeros((), dtype=torch.float64)


def ref_triplet(x, labels, margin, mining, distance):
    """Returns (loss, per_example list, active fraction)."""
    e = ref_unit(x)
    n = len(e)
    y = labels.tolist()

    def d(i, j):
        return ref_distance(e[i], e[j], distance)

    per_example = [0.0] * n
    losses, active, total = [], 0, 0
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [q for q in range(n) if y[q] != y[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            hardest_pos = max(d(a, p) for p in pos)
            hardest_neg = min(d(a, q) for q in neg)
            value = ref_relu(hardest_pos - hardest_neg + margin)
            losses.append(value)
            per_example[a] = value.item()
            active += int(value > 0)
            total += 1
        elif mining == "semi_hard":
            anchor_losses = []
            for p in pos:
                d_ap = d(a, p)
                beyond = [d(a, q) for q in neg if d(a, q) > d_ap]
                d_an = min(beyond) if beyond else min(d(a, q) for q in neg)
                value = ref_relu(d_ap - d_an + margin)
                anchor_losses.append(value)
                active += int(value > 0)
                total += 1
            losses.extend(anchor_losses)
            per_example[a] = sum(v.item() for v in anchor_losses) / len(anchor_losses)
        else:  # all
            anchor_sum, anchor_count = 0.0, 0
            for p in pos:
                for q in neg:
                    value = ref_relu(d(a, p) - d(a, q) + margin)
                    if value > 0:
                        losses.append(value)
                        active += 1
                    anchor_sum += value.item()
                    anchor_count += 1
                    total += 1
            per_example[a] = anchor_sum / anchor_count
    return ref_mean(losses), per_example, (active / total if total else 0.0)


def ref_contrastive(x, labels, pos_margin, neg_margin, distance):
    e = ref_unit(x)
    n = len(e)
    y = labels.tolist()
    pos_active, neg_active = [], []
    per_example = []
    for i in range(n):
        anchor = []
        for j in range(n):
            if i == j:
                continue
            dij = ref_distance(e[i], e[j], distance)
            if y[i] == y[j]:
                value = ref_relu(dij - pos_margin)
                if value > 0:
                    pos_active.append(value)
            else:
                value = ref_relu(neg_margin - dij)
                if value > 0:
                    neg_active.append(value)
            anchor.append(value.item())
        per_example.append(sum(anchor) / len(anchor) if anchor else 0.0)
    return ref_mean(pos_active) + ref_mean(neg_active), per_example


def ref_multi_similarity(x, labels, alpha, beta, base, epsilon):
    """The authors' per-anchor loop (MalongTech/research-ms-loss), self pair dropped by index."""
    e = ref_unit(x)
    n = len(e)
    y = labels.tolist()
    per_example = [torch.zeros((), dtype=torch.float64)] * n
    for a in range(n):
        pos = [(e[a] * e[p]).sum() for p in range(n) if p != a and y[p] == y[a]]
        neg = [(e[a] * e[q]).sum() for q in range(n) if y[q] != y[a]]
        if not pos or not neg:
            continue
        kept_neg = [s for s in neg if s > min(pos) - epsilon]
        kept_pos = [s for s in pos if s < max(neg) + epsilon]
        if not kept_neg or not kept_pos:
            continue
        pos_term = torch.log(1 + sum(torch.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
        neg_term = torch.log(1 + sum(torch.exp(beta * (s - base)) for s in kept_neg)) / beta
        per_example[a] = pos_term + neg_term
    return sum(per_example) / n, [v.item() for v in per_example]


def ref_normalized_softmax(x, proxies, labels, temperature, margin):
    e = ref_unit(x)
    w = ref_unit(proxies)
    per_example = []
    for i, yi in enumerate(labels.tolist()):
        logits = []
        for c in range(len(w)):
            cos = (e[i] * w[c]).sum()
            logits.append((cos - (margin if c == yi else 0.0)) / temperature)
        log_partition = torch.log(sum(torch.exp(z) for z in logits))
        per_example.append(log_partition - logits[yi])
    return sum(per_example) / len(per_example), [v.item() for v in per_example]


def ref_proxy_anchor(x, proxies, labels, margin, alpha):
    e = ref_unit(x)
    w = ref_unit(proxies)
    y = labels.tolist()
    pos_sum, neg_sum, with_positives = 0.0, 0.0, 0
    for c in range(len(w)):
        members = [i for i in range(len(e)) if y[i] == c]
        others = [i for i in range(len(e)) if y[i] != c]
        if members:
            with_positives += 1
            pos_sum = pos_sum + torch.log(
                1 + sum(torch.exp(-alpha * ((e[i] * w[c]).sum() - margin)) for i in members)
            )
        if others:
            neg_sum = neg_sum + torch.log(
                1 + sum(torch.exp(alpha * ((e[i] * w[c]).sum() + margin)) for i in others)
            )
    return pos_sum / with_positives + neg_sum / len(w)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def random_batch(n, dim, num_labels, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=dtype)
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    return x, labels


def value_and_grads(fn, *inputs):
    """Scalar `fn(*leaves)` and the gradients of it w.r.t. fresh leaf copies of `inputs`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = [
        torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves, strict=True)
    ]
    return value.detach(), grads


def assert_matches_reference(impl_fn, ref_fn, *inputs):
    impl_value, impl_grads = value_and_grads(impl_fn, *inputs)
    ref_value, ref_grads = value_and_grads(ref_fn, *inputs)
    torch.testing.assert_close(impl_value, ref_value, **TOL)
    for impl_grad, ref_grad in zip(impl_grads, ref_grads, strict=True):
        torch.testing.assert_close(impl_grad, ref_grad, **TOL)


def with_proxies(loss_fn, proxies, embeddings, labels):
    """Call a proxy loss with `proxies` in place of its parameter, so autograd reaches them."""
    return torch.func.functional_call(loss_fn, {"proxies": proxies}, (embeddings, labels))


def pair_loss_instances():
    """One instance of every pair/triplet loss, for the contract tests."""
    return [
        TripletMarginLoss(mining="batch_hard"),
        TripletMarginLoss(mining="semi_hard"),
        TripletMarginLoss(mining="all"),
        TripletMarginLoss(mining="batch_hard", distance="squared"),
        ContrastiveLoss(),
        MultiSimilarityLoss(),
    ]


def proxy_loss_instances(num_classes, dim):
    torch.manual_seed(0)
    return [
        NormalizedSoftmaxLoss(num_classes, dim).double(),
        NormalizedSoftmaxLoss(num_classes, dim, margin=0.1).double(),
        ProxyAnchorLoss(num_classes, dim).double(),
    ]


# ----------------------------------------------------------------------------------------------
# Triplet
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_triplet_matches_loop_reference(mining, distance, shape, seed):
    x, labels = random_batch(*shape, seed)
    margin = 0.2 if distance == "euclidean" else 0.5
    loss_fn = TripletMarginLoss(margin=margin, mining=mining, distance=distance)
    assert_matches_reference(
        lambda e: loss_fn(e, labels).loss,
        lambda e: ref_triplet(e, labels, margin, mining, distance)[0],
        x,
    )
    out = loss_fn(x, labels)
    _, ref_per_example, ref_active = ref_triplet(x, labels, margin, mining, distance)
    torch.testing.assert_close(out.per_example, torch.tensor(ref_per_example, dtype=x.dtype), **TOL)
    assert out.stats["active_triplet_fraction"] == pytest.approx(ref_active, abs=1e-6)


def _four_points():
    # a = (1, 0), b = (0.6, 0.8) of class 0;  c = (0, 1), d = (-1, 0) of class 1 (all unit norm).
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    return x, torch.tensor([0, 0, 1, 1])


def test_triplet_batch_hard_by_hand():
    # d(a,b) = sqrt(0.4^2 + 0.8^2) = sqrt(0.8); d(a,c) = sqrt(2); d(a,d) = 2;
    # d(b,c) = sqrt(0.6^2 + 0.2^2) = sqrt(0.4); d(b,d) = sqrt(1.6^2 + 0.8^2) = sqrt(3.2);
    # d(c,d) = sqrt(2).  margin 0.2:
    #   a: sqrt(0.8) - min(sqrt2, 2)           + 0.2 = -0.3198 -> 0
    #   b: sqrt(0.8) - min(sqrt0.4, sqrt3.2)   + 0.2 =  0.461971
    #   c: sqrt(2)   - min(sqrt2, sqrt0.4)     + 0.2 =  0.981758
    #   d: sqrt(2)   - min(2, sqrt3.2)         + 0.2 = -0.1746 -> 0
    # mean over the 4 anchors = (0.461971 + 0.981758) / 4 = 0.360932
    x, labels = _four_points()
    out = TripletMarginLoss(margin=0.2, mining="batch_hard")(x, labels)
    b = math.sqrt(0.8) - math.sqrt(0.4) + 0.2
    c = math.sqrt(2.0) - math.sqrt(0.4) + 0.2
    assert out.loss.item() == pytest.approx((b + c) / 4, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.360932, abs=1e-6)
    torch.testing.assert_close(
        out.per_example, torch.tensor([0.0, b, c, 0.0], dtype=x.dtype), **TOL
    )
    assert out.stats["active_triplet_fraction"] == 0.5

    # Squared distances: b: 0.8 - 0.4 + 0.2 = 0.6; c: 2 - 0.4 + 0.2 = 1.8; a, d inactive.
    out = TripletMarginLoss(margin=0.2, mining="batch_hard", distance="squared")(x, labels)
    assert out.loss.item() == pytest.approx((0.6 + 1.8) / 4, abs=1e-12)


def test_triplet_semi_hard_by_hand_uses_hardest_negative_as_fallback():
    # a = (1, 0), b = (0.6, 0.8) of class 0;  c = (0, 1), d = (0.8, -0.6) of class 1.
    # Squared distances (2 - 2 cos): ab 0.8, ac 2, ad 0.4, bc 0.4, bd 2, cd 3.2.  margin 0.2:
    #   (a,b): d_ap 0.8, negatives c 2, d 0.4 -> semi-hard c: 0.8 - 2 + 0.2 < 0 -> 0
    #   (b,a): d_ap 0.8, negatives c 0.4, d 2 -> semi-hard d: 0.8 - 2 + 0.2 < 0 -> 0
    #   (c,d): d_ap 3.2, negatives a 2, b 0.4 -> none beyond 3.2, hardest b: 3.2 - 0.4 + 0.2 = 3.0
    #   (d,c): d_ap 3.2, negatives a 0.4, b 2 -> none beyond 3.2, hardest a: 3.0
    # mean over the 4 pairs = 6 / 4 = 1.5 (falling back to the *easiest* negative would give 0.7).
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, -0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    out = TripletMarginLoss(margin=0.2, mining="semi_hard", distance="squared")(x, labels)
    assert out.loss.item() == pytest.approx(1.5, abs=1e-12)
    torch.testing.assert_close(
        out.per_example, torch.tensor([0.0, 0.0, 3.0, 3.0], dtype=x.dtype), **TOL
    )
    assert out.stats["active_triplet_fraction"] == 0.5


def test_triplet_all_averages_over_active_triplets():
    # Same points as the batch-hard case, euclidean, margin 0.2. Triplets (a, p, n):
    #   a: sqrt.8 - sqrt2 + .2 < 0,    sqrt.8 - 2 + .2 < 0
    #   b: sqrt.8 - sqrt.4 + .2 = 0.461971 (active),  sqrt.8 - sqrt3.2 + .2 < 0
    #   c: sqrt2 - sqrt2 + .2 = 0.2 (active),  sqrt2 - sqrt.4 + .2 = 0.981758 (active)
    #   d: sqrt2 - 2 + .2 < 0,  sqrt2 - sqrt3.2 + .2 < 0
    # mean over the 3 active ones = (0.461971 + 0.2 + 0.981758) / 3
    x, labels = _four_points()
    out = TripletMarginLoss(margin=0.2, mining="all")(x, labels)
    expected = (
        math.sqrt(0.8) - math.sqrt(0.4) + 0.2 + 0.2 + math.sqrt(2) - math.sqrt(0.4) + 0.2
    ) / 3
    # d(a,c) and d(c,a) are both sqrt(2) only up to rounding; the 0.2 triplet is far from a kink.
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.stats["active_triplet_fraction"] == pytest.approx(3 / 8)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
@pytest.mark.parametrize(
    "labels",
    [[0, 0, 0, 0], [0, 1, 2, 3], [0], [0, 1]],
    ids=["one-class", "all-singletons", "single-example", "two-singletons"],
)
def test_triplet_without_valid_triplet_is_connected_zero(mining, labels):
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 3, dtype=torch.float64, requires_grad=True)
    out = TripletMarginLoss(mining=mining)(x, labels)
    assert out.loss.item() == 0.0
    assert out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(out.per_example, torch.zeros(len(labels), dtype=x.dtype))
    assert out.stats["active_triplet_fraction"] == 0.0


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
def test_triplet_singleton_class_contributes_nothing(mining):
    x, _ = random_batch(5, 3, 1, seed=3)
    labels = torch.tensor([0, 0, 1, 1, 2])
    out = TripletMarginLoss(margin=1.0, mining=mining)(x, labels)
    assert out.per_example[4] == 0.0
    assert out.loss.item() == pytest.approx(
        ref_triplet(x, labels, 1.0, mining, "euclidean")[0].item()
    )


def test_triplet_rejects_unknown_options():
    with pytest.raises(ValueError):
        TripletMarginLoss(mining="hardest")
    with pytest.raises(ValueError):
        TripletMarginLoss(distance="cosine")


# ----------------------------------------------------------------------------------------------
# Contrastive
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "margins,distance",
    [((0.0, 0.5), "euclidean"), ((0.9, 1.5), "euclidean"), ((0.2, 1.5), "squared")],
)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_contrastive_matches_loop_reference(margins, distance, shape, seed):
    x, labels = random_batch(*shape, seed)
    pos_margin, neg_margin = margins
    loss_fn = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, distance=distance)
    assert_matches_reference(
        lambda e: loss_fn(e, labels).loss,
        lambda e: ref_contrastive(e, labels, pos_margin, neg_margin, distance)[0],
        x,
    )
    _, ref_per_example = ref_contrastive(x, labels, pos_margin, neg_margin, distance)
    out = loss_fn(x, labels)
    torch.testing.assert_close(out.per_example, torch.tensor(ref_per_example, dtype=x.dtype), **TOL)


def test_contrastive_by_hand():
    # a = (1, 0), b = (0.6, 0.8) of class 0; c = (0, 1) of class 1; pos_margin 0, neg_margin 1.
    # Positive pairs (a,b), (b,a): d = sqrt(0.8) = 0.894427, both active -> mean sqrt(0.8).
    # Negative pairs: a-c: 1 - sqrt(2) < 0; b-c, c-b: 1 - sqrt(0.4) = 0.367544 -> mean 0.367544.
    # loss = sqrt(0.8) + 1 - sqrt(0.4) = 1.261971
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    out = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)(x, labels)
    assert out.loss.item() == pytest.approx(math.sqrt(0.8) + 1 - math.sqrt(0.4), abs=1e-12)
    # per anchor: a: (sqrt.8 + 0) / 2; b: (sqrt.8 + 1 - sqrt.4) / 2; c: (0 + 1 - sqrt.4) / 2
    expected = [
        math.sqrt(0.8) / 2,
        (math.sqrt(0.8) + 1 - math.sqrt(0.4)) / 2,
        (1 - math.sqrt(0.4)) / 2,
    ]
    torch.testing.assert_close(out.per_example, torch.tensor(expected, dtype=x.dtype), **TOL)
    assert out.stats == {"active_positive_fraction": 1.0, "active_negative_fraction": 0.5}


def test_contrastive_degenerate_batches():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    # All singletons, every negative beyond a tiny margin: no active pair at all.
    out = ContrastiveLoss(neg_margin=1e-6)(x, torch.tensor([0, 1, 2, 3]))
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # One class: only the positive term remains.
    labels = torch.zeros(4, dtype=torch.long)
    out = ContrastiveLoss()(x, labels)
    assert out.loss.item() == pytest.approx(
        ref_contrastive(x, labels, 0.0, 0.5, "euclidean")[0].item()
    )
    # A single example has no pair.
    out = ContrastiveLoss()(x[:1], labels[:1])
    assert out.loss.item() == 0.0 and out.per_example.tolist() == [0.0]


# ----------------------------------------------------------------------------------------------
# Multi-similarity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
        {"alpha": 2.0, "beta": 40.0, "base": 0.0, "epsilon": 0.5},
        {"alpha": 1.0, "beta": 10.0, "base": 0.2, "epsilon": 2.0},
    ],
)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_multi_similarity_matches_loop_reference(params, shape, seed):
    x, labels = random_batch(*shape, seed)
    loss_fn = MultiSimilarityLoss(**params)
    assert_matches_reference(
        lambda e: loss_fn(e, labels).loss,
        lambda e: ref_multi_similarity(e, labels, **params)[0],
        x,
    )
    _, ref_per_example = ref_multi_similarity(x, labels, **params)
    out = loss_fn(x, labels)
    torch.testing.assert_close(out.per_example, torch.tensor(ref_per_example, dtype=x.dtype), **TOL)


def test_multi_similarity_by_hand():
    # a = (1, 0), b = (0.6, 0.8) of class 0; c = (0.8, 0.6) of class 1.
    # Similarities: ab 0.6, ac 0.8, bc 0.96. Defaults alpha 2, beta 50, base 0.5, epsilon 0.1.
    #   a: negative 0.8 > 0.6 - 0.1 kept; positive 0.6 < 0.8 + 0.1 kept
    #      l = log(1 + e^{-2 (0.6 - 0.5)}) / 2 + log(1 + e^{50 (0.8 - 0.5)}) / 50
    #   b: negative 0.96 kept; positive 0.6 kept
    #      l = log(1 + e^{-0.2}) / 2 + log(1 + e^{50 (0.96 - 0.5)}) / 50
    #   c: no positive -> 0.     loss = (l_a + l_b) / 3
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    pos = math.log(1 + math.exp(-0.2)) / 2
    l_a = pos + math.log(1 + math.exp(15.0)) / 50
    l_b = pos + math.log(1 + math.exp(23.0)) / 50
    out = MultiSimilarityLoss()(x, labels)
    assert out.loss.item() == pytest.approx((l_a + l_b) / 3, abs=1e-12)
    torch.testing.assert_close(out.per_example, torch.tensor([l_a, l_b, 0.0], dtype=x.dtype), **TOL)
    assert out.stats["mined_anchor_fraction"] == pytest.approx(2 / 3)


def test_multi_similarity_easy_batch_mines_nothing():
    # a = (1, 0), b = (0.8, 0.6) of class 0; c = (0, 1) of class 1. Similarities ab 0.8, ac 0,
    # bc 0.6. a: 0.8 >= 0 + 0.1; b: 0.8 >= 0.6 + 0.1 -> no pair kept anywhere, loss 0.
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out = MultiSimilarityLoss()(x, torch.tensor([0, 0, 1]))
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert out.stats["mined_anchor_fraction"] == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3], [0]])
def test_multi_similarity_without_pairs_is_connected_zero(labels):
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 3, dtype=torch.float64, requires_grad=True)
    out = MultiSimilarityLoss()(x, labels)
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# Normalised softmax
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,margin", [(0.05, 0.0), (0.1, 0.0), (0.05, 0.1), (1.0, 0.3)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_normalized_softmax_matches_loop_reference(temperature, margin, shape, seed):
    n, dim, num_classes = shape
    x, labels = random_batch(n, dim, num_classes, seed)
    loss_fn = NormalizedSoftmaxLoss(num_classes, dim, temperature=temperature, margin=margin)
    loss_fn = loss_fn.double()
    proxies = loss_fn.proxies.detach().clone()

    assert_matches_reference(
        lambda e, w: with_proxies(loss_fn, w, e, labels).loss,
        lambda e, w: ref_normalized_softmax(e, w, labels, temperature, margin)[0],
        x,
        proxies,
    )
    _, ref_per_example = ref_normalized_softmax(x, proxies, labels, temperature, margin)
    out = loss_fn(x, labels)
    torch.testing.assert_close(out.per_example, torch.tensor(ref_per_example, dtype=x.dtype), **TOL)


def test_normalized_softmax_margin_against_cross_entropy_on_hand_built_logits():
    # x = (0.6, 0.8); proxies (1, 0), (0, 1), (-1, 0) -> cosines 0.6, 0.8, -0.6.
    # Label 0, margin 0.1, temperature 0.05: logits (0.6 - 0.1, 0.8, -0.6) / 0.05 = (10, 16, -12).
    loss_fn = NormalizedSoftmaxLoss(3, 2, temperature=0.05, margin=0.1).double()
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    x = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    out = loss_fn(x, torch.tensor([0]))
    logits = torch.tensor([[10.0, 16.0, -12.0]], dtype=torch.float64)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0]))
    torch.testing.assert_close(out.loss.detach(), expected, **TOL)
    # Worked out: log(e^10 + e^16 + e^-12) - 10 = 6.0024756...
    assert out.loss.item() == pytest.approx(
        math.log(math.exp(10) + math.exp(16) + math.exp(-12)) - 10
    )
    assert out.stats["proxy_accuracy"] == 0.0  # the nearest proxy is class 1's


def test_normalized_softmax_promotes_to_the_wider_dtype():
    loss_fn = NormalizedSoftmaxLoss(4, 3)  # float32 proxies
    x, labels = random_batch(6, 3, 4, seed=0)
    assert loss_fn(x, labels).loss.dtype == torch.float64
    assert loss_fn(x.float(), labels).loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Proxy anchor
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.0, 8.0), (0.3, 16.0)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_proxy_anchor_matches_loop_reference(margin, alpha, shape, seed):
    n, dim, num_classes = shape
    # One extra class that never occurs in the batch: its proxy only has negatives.
    x, labels = random_batch(n, dim, num_classes, seed)
    loss_fn = ProxyAnchorLoss(num_classes + 1, dim, margin=margin, alpha=alpha).double()
    proxies = loss_fn.proxies.detach().clone()

    assert_matches_reference(
        lambda e, w: with_proxies(loss_fn, w, e, labels).loss,
        lambda e, w: ref_proxy_anchor(e, w, labels, margin, alpha),
        x,
        proxies,
    )


def test_proxy_anchor_stats_and_absent_classes():
    loss_fn = ProxyAnchorLoss(5, 3).double()
    x, _ = random_batch(4, 3, 1, seed=0)
    out = loss_fn(x, torch.tensor([0, 0, 1, 1]))
    assert out.per_example is None
    assert out.stats["positive_proxy_fraction"] == pytest.approx(2 / 5)


# ----------------------------------------------------------------------------------------------
# Contract shared by all of them
# ----------------------------------------------------------------------------------------------


def _all_instances():
    return pair_loss_instances() + proxy_loss_instances(num_classes=4, dim=5)


@pytest.mark.parametrize("index", range(len(_all_instances())))
def test_gradcheck(index):
    loss_fn = _all_instances()[index]
    x, labels = random_batch(8, 5, 3, seed=11)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels).loss, (x,))


@pytest.mark.parametrize("index", range(len(_all_instances())))
def test_deterministic_and_float32(index):
    loss_fn = _all_instances()[index]
    x, labels = random_batch(12, 5, 4, seed=5)
    first = value_and_grads(lambda e: loss_fn(e, labels).loss, x)
    second = value_and_grads(lambda e: loss_fn(e, labels).loss, x)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][0], second[1][0])
    out = loss_fn(x, labels)
    assert out.stats == loss_fn(x, labels).stats
    if out.per_example is not None:
        assert out.per_example.shape == (12,) and not out.per_example.requires_grad

    single = loss_fn.float()(x.float(), labels)
    assert single.loss.dtype == torch.float32
    torch.testing.assert_close(single.loss.double(), out.loss, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("index", range(len(_all_instances())))
def test_coincident_embeddings_give_finite_gradients(index):
    # Duplicated rows (same and different labels) put sqrt at 0 off the diagonal.
    loss_fn = _all_instances()[index]
    x, _ = random_batch(3, 5, 1, seed=7)
    x = torch.cat([x, x[:2]]).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 2])
    loss_fn(x, labels).loss.backward()
    assert torch.isfinite(x.grad).all()
