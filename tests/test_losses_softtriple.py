"""SoftTriple loss against methods.md section 3 and a float64 loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.softtriple import SoftTripleLoss

F64 = torch.float64


def _loss_with_centers(centers, num_classes, **kwargs):
    """A float64 SoftTripleLoss whose (class-major) centers are set by hand."""
    centers = torch.as_tensor(centers, dtype=F64)
    loss = SoftTripleLoss(
        num_classes, centers.shape[1], centers_per_class=centers.shape[0] // num_classes, **kwargs
    ).double()
    with torch.no_grad():
        loss.centers.copy_(centers)
    return loss


def _check_loss():
    """methods.md check: class 0 centers (1,0),(0,1); class 1 centers (0.8,0.6),(-1,0)."""
    centers = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]]
    return _loss_with_centers(centers, 2, la=20.0, gamma=0.1, tau=0.2, margin=0.01)


def test_check_values():
    loss = _check_loss()
    x, y = torch.tensor([[0.6, 0.8]], dtype=F64), torch.tensor([0])
    torch.testing.assert_close(
        loss.class_similarities(x),
        torch.tensor([[0.776159, 0.960000]], dtype=F64),
        rtol=0,
        atol=1e-6,
    )
    out = loss(x, y)
    assert out.stats["cross_entropy"] == pytest.approx(3.897312, abs=1e-6)
    assert out.stats["R"] == pytest.approx(0.827897, abs=1e-6)
    assert out.loss.item() == pytest.approx(4.062891, abs=1e-6)
    assert out.per_example.shape == (1,) and not out.per_example.requires_grad


def test_check_values_float32_and_unnormalised_input():
    loss = _check_loss().float()
    out = loss(torch.tensor([[3.0, 4.0]]), torch.tensor([0]))  # normalised inside to (0.6, 0.8)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(4.062891, abs=1e-5)


def _reference_softtriple(x, y, centers, num_classes, la, gamma, tau, margin):
    """Plain float64 loop over examples, classes and centers."""
    x, centers, y = x.tolist(), centers.tolist(), y.tolist()

    def unit(a):
        n = math.sqrt(sum(v * v for v in a))
        return [v / n for v in a]

    def dot(a, b):
        return sum(p * q for p, q in zip(a, b, strict=True))

    x = [unit(a) for a in x]
    w = [unit(c) for c in centers]
    k = len(w) // num_classes
    losses = []
    for xi, yi in zip(x, y, strict=True):
        logits = []
        for c in range(num_classes):
            sims = [dot(xi, w[c * k + t]) for t in range(k)]
            top = max(s / gamma for s in sims)
            weights = [math.exp(s / gamma - top) for s in sims]
            s_c = sum(wt * s for wt, s in zip(weights, sims, strict=True)) / sum(weights)
            logits.append(la * (s_c - (margin if c == yi else 0.0)))
        top = max(logits)
        losses.append(top + math.log(sum(math.exp(v - top) for v in logits)) - logits[yi])
    loss = sum(losses) / len(losses)
    if tau > 0 and k > 1:
        r = sum(
            math.sqrt(2 + 1e-5 - 2 * dot(w[c * k + t], w[c * k + s]))
            for c in range(num_classes)
            for t in range(k)
            for s in range(t + 1, k)
        )
        loss += tau * r / (num_classes * k * (k - 1))
    return losses, loss


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", [1, 3])
def test_matches_float64_loop(seed, k):
    g = torch.Generator().manual_seed(seed)
    num_classes, dim = 4, 6
    x = torch.randn(10, dim, generator=g, dtype=F64)
    y = torch.randint(0, num_classes, (10,), generator=g)
    params = dict(la=20.0, gamma=0.1, tau=0.2, margin=0.01)
    centers = torch.randn(num_classes * k, dim, generator=g, dtype=F64)
    out = _loss_with_centers(centers, num_classes, **params)(x, y)
    per_example, expected = _reference_softtriple(x, y, centers, num_classes, **params)
    torch.testing.assert_close(
        out.per_example, torch.tensor(per_example, dtype=F64), rtol=0, atol=1e-10
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-10)


def test_one_center_is_normalised_softmax_with_margin():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (8,), generator=g)
    centers = torch.randn(3, 5, generator=g, dtype=F64)
    la, margin = 16.0, 0.1
    out = _loss_with_centers(centers, 3, la=la, margin=margin, tau=0.2)(x, y)
    cosine = F.normalize(x, dim=1) @ F.normalize(centers, dim=1).T
    expected = F.cross_entropy(la * (cosine - margin * F.one_hot(y, 3).to(F64)), y)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert out.stats["R"] == 0.0


def test_duplicated_centers_reproduce_one_center():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (8,), generator=g)
    centers = torch.randn(3, 5, generator=g, dtype=F64)
    single = _loss_with_centers(centers, 3)(x, y)
    repeated = _loss_with_centers(centers.repeat_interleave(4, dim=0), 3)(x, y)  # class-major
    torch.testing.assert_close(repeated.per_example, single.per_example, rtol=0, atol=1e-12)


def test_small_gamma_gives_max_over_centers():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5, generator=g, dtype=F64)
    centers = torch.randn(3 * 4, 5, generator=g, dtype=F64)
    loss = _loss_with_centers(centers, 3, gamma=1e-4)
    cosine = F.normalize(x, dim=1) @ F.normalize(centers, dim=1).T
    expected = cosine.view(8, 3, 4).amax(dim=2)
    torch.testing.assert_close(loss.class_similarities(x), expected, rtol=0, atol=1e-8)


def test_no_regulariser_when_tau_is_zero():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 1, 0])
    out = _loss_with_centers(torch.randn(2 * 3, 3, generator=g, dtype=F64), 2, tau=0.0)(x, y)
    assert out.stats["R"] == 0.0
    assert out.loss.item() == pytest.approx(out.per_example.mean().item(), abs=1e-15)


def test_gradcheck_embeddings_and_centers():
    g = torch.Generator().manual_seed(7)
    loss = SoftTripleLoss(3, 4, centers_per_class=2, la=5.0, gamma=0.5).double()
    x = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    centers = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)

    def fn(embeddings, c):
        return torch.func.functional_call(loss, {"centers": c}, (embeddings, y)).loss

    assert torch.autograd.gradcheck(fn, (x, centers), eps=1e-6, atol=1e-6)


def test_parameters_are_the_centers():
    loss = SoftTripleLoss(5, 8, centers_per_class=3)
    params = list(loss.parameters())
    assert len(params) == 1 and params[0] is loss.centers
    assert loss.centers.shape == (15, 8)
    assert loss.batch_requirement == "any"
