"""PDDM unit, quadruplet mining and double-header hinge against methods.md section 2."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.pddm import PDDMLoss, PDDMUnit, mine_quadruplets, semi_hard_negatives

F64 = torch.float64


def _features(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=F64), dim=1)


def _unit(dim=4, hidden=5, seed=0):
    torch.manual_seed(seed)
    return PDDMUnit(dim, hidden).double()


def _reference_score(unit, fi, fj):
    """The unit in plain float64 numpy, on weights copied out of the module."""
    w = {name: p.detach().numpy().astype(np.float64) for name, p in unit.named_parameters()}

    def normalise(a):
        return a / max(np.linalg.norm(a), unit.eps)

    def relu(a):
        return np.maximum(a, 0.0)

    fi, fj = np.asarray(fi, dtype=np.float64), np.asarray(fj, dtype=np.float64)
    u = normalise(np.abs(fi - fj))
    v = normalise((fi + fj) / 2)
    u1 = normalise(relu(w["u_layer.weight"] @ u + w["u_layer.bias"]))
    v1 = normalise(relu(w["v_layer.weight"] @ v + w["v_layer.bias"]))
    c = relu(w["c_layer.weight"] @ np.concatenate([u1, v1]) + w["c_layer.bias"])
    return float(w["score_layer.weight"][0] @ c + w["score_layer.bias"][0])


def test_unit_matches_numpy_reference():
    unit = _unit(seed=1)
    f = _features(5, 4, seed=2)
    for i, j in itertools.product(range(5), repeat=2):
        assert unit.score(f[i], f[j]).item() == pytest.approx(
            _reference_score(unit, f[i], f[j]), abs=1e-12
        )


def test_scores_are_symmetric():
    unit = _unit(seed=3)
    f = _features(7, 4, seed=4)
    assert torch.equal(unit.score(f[:3], f[3:6]), unit.score(f[3:6], f[:3]))
    scores = unit.pairwise_scores(f)
    assert torch.equal(scores, scores.T)
    scores32 = unit.float().pairwise_scores(f.float())
    assert torch.equal(scores32, scores32.T)


def test_pairwise_scores_equal_per_pair_scores():
    unit = _unit(seed=5)
    f = _features(6, 4, seed=6)
    scores = unit.pairwise_scores(f)
    expected = torch.stack(
        [torch.stack([unit.score(f[i], f[j]) for j in range(6)]) for i in range(6)]
    )
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)


def test_identical_features_are_finite():
    """u = |f - f| = 0: the eps in the normalisation keeps the score and its gradient finite."""
    unit = _unit(seed=7)
    f = _features(1, 4, seed=8).repeat(3, 1).requires_grad_(True)
    scores = unit.pairwise_scores(f)
    scores.sum().backward()
    assert torch.isfinite(scores).all() and torch.isfinite(f.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in unit.parameters())


# A hand-built batch: 3 classes x 2 examples, plus one class with a single example (no positive
# pair of its own, but a negative for everyone else).
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 3])


def _brute_force_quadruplets(scores, labels, negatives="hardest"):
    """Every (i, j, k, l) by loops over the score matrix, hardest first (ties: first found).

    semi_hard: a's negative for the pair scoring `below` is its highest-scoring negative that
    scores less than `below`, else its hardest."""
    s, y, n = scores.tolist(), labels.tolist(), len(labels)

    def negative_of(a, below=float("inf")):
        best = None
        for b in range(n):
            if y[b] != y[a] and s[a][b] < below and (best is None or s[a][b] > s[a][best]):
                best = b
        return negative_of(a) if best is None else best

    def quadruplet(i, j):
        if negatives == "hardest":
            return (i, j, negative_of(i), negative_of(j))
        return (i, j, negative_of(i, s[i][j]), negative_of(j, s[i][j]))

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if y[i] == y[j]]
    quads = [quadruplet(i, j) for i, j in pairs]
    hardest = min(quads, key=lambda q: s[q[0]][q[1]])
    return hardest, quads


def _hand_loss(quads, scores, features, alpha, beta, lam):
    """E_m, E_e and E averaged over the quadruplets, from the formulas of methods.md."""
    s = scores.tolist()
    f = features.tolist()

    def dist(a, b):
        return sum((p - q) ** 2 for p, q in zip(f[a], f[b], strict=True))

    e_m = e_e = 0.0
    for i, j, k, neg_j in quads:
        e_m += max(0.0, alpha + s[i][k] - s[i][j]) + max(0.0, alpha + s[j][neg_j] - s[i][j])
        e_e += max(0.0, beta + dist(i, j) - dist(i, k)) + max(
            0.0, beta + dist(i, j) - dist(j, neg_j)
        )
    e_m, e_e = e_m / len(quads), e_e / len(quads)
    return e_m, e_e, e_m + lam * e_e


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mining_picks_the_brute_force_quadruplets(seed):
    unit = _unit(seed=seed)
    scores = unit.pairwise_scores(_features(7, 4, seed=10 + seed))
    hardest, quads = _brute_force_quadruplets(scores, LABELS)

    pairs, negative = mine_quadruplets(scores, LABELS, "hardest")
    i, j, k, neg_j = hardest
    assert pairs.nonzero().tolist() == [[i, j]]
    assert (negative[i].item(), negative[j].item()) == (k, neg_j)

    pairs, negative = mine_quadruplets(scores, LABELS, "per_positive_pair")
    mined = [(a, b, negative[a].item(), negative[b].item()) for a, b in pairs.nonzero().tolist()]
    assert mined == quads


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_semi_hard_negatives_score_below_their_pair(seed):
    unit = _unit(seed=seed)
    scores = unit.pairwise_scores(_features(7, 4, seed=10 + seed))
    _, quads = _brute_force_quadruplets(scores, LABELS, "semi_hard")
    _, hardest = mine_quadruplets(scores, LABELS, "per_positive_pair")
    chosen = semi_hard_negatives(scores, LABELS, hardest)
    assert [(i, j, chosen[i, j].item(), chosen[j, i].item()) for i, j, _, _ in quads] == quads
    assert all(scores[i, k] < scores[i, j] for i, j, k, _ in quads if k != hardest[i])


def test_semi_hard_falls_back_to_the_hardest_negative():
    """S_ab = a + b: 3's negatives all outscore the pair (0, 3), so 3 gets its hardest."""
    idx = torch.arange(7, dtype=F64)
    scores = idx[:, None] + idx[None, :]
    _, hardest = mine_quadruplets(scores, LABELS, "per_positive_pair")
    chosen = semi_hard_negatives(scores, LABELS, hardest)
    assert hardest.tolist() == [6, 6, 6, 6, 6, 6, 5]
    # Pair (0, 3), S = 3: 0's negatives score 1, 2, 4, 5, 6 -> 2 (index 2); 3's score 4, 5, 7, 8,
    # 9 -> none below 3 -> its hardest, 6. Pair (1, 4), S = 5: 1's negatives score 1, 3, 4, 6, 7
    # -> 4 (index 3); 4's score 4, 6, 7, 9, 10 -> 4 (index 0).
    assert (chosen[0, 3].item(), chosen[3, 0].item()) == (2, 6)
    assert (chosen[1, 4].item(), chosen[4, 1].item()) == (3, 0)


@pytest.mark.parametrize("negatives", ["hardest", "semi_hard"])
@pytest.mark.parametrize("mode", ["hardest", "per_positive_pair"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_loss_matches_hand_computation(mode, negatives, seed):
    alpha, beta, lam = 0.5, 1.0, 0.5
    loss = PDDMLoss(
        4, 5, alpha=alpha, beta=beta, lam=lam, quadruplets=mode, negatives=negatives
    ).double()
    torch.manual_seed(seed)
    for p in loss.unit.parameters():
        torch.nn.init.normal_(p)
    embeddings = 3.0 * _features(7, 4, seed=20 + seed)  # the loss normalises
    out = loss(embeddings, LABELS)

    features = F.normalize(embeddings, dim=1)
    scores = torch.tensor(
        [
            [_reference_score(loss.unit, features[a], features[b]) for b in range(7)]
            for a in range(7)
        ],
        dtype=F64,
    )
    hardest, quads = _brute_force_quadruplets(scores, LABELS, negatives)
    e_m, e_e, total = _hand_loss(
        [hardest] if mode == "hardest" else quads, scores, features, alpha, beta, lam
    )
    assert out.loss.item() == pytest.approx(total, abs=1e-10)
    assert out.stats["E_m"] == pytest.approx(e_m, abs=1e-10)
    assert out.stats["E_e"] == pytest.approx(e_e, abs=1e-10)
    assert out.stats["quadruplets"] == (1 if mode == "hardest" else len(quads))
    if mode == "hardest":
        i, j, k, neg_j = hardest
        assert out.stats["positive_score"] == pytest.approx(scores[i, j].item(), abs=1e-10)
        expected_negative = (scores[i, k] + scores[j, neg_j]).item() / 2
        assert out.stats["negative_score"] == pytest.approx(expected_negative, abs=1e-10)


@pytest.mark.parametrize(
    ("mode", "negatives"),
    [("hardest", "hardest"), ("per_positive_pair", "hardest"), ("per_positive_pair", "semi_hard")],
)
def test_gradcheck_embeddings_and_unit(mode, negatives):
    # Margins large enough that every hinge is active.
    loss = PDDMLoss(4, 5, alpha=2.0, beta=3.0, quadruplets=mode, negatives=negatives).double()
    embeddings = _features(7, 4, seed=30).requires_grad_(True)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in loss.named_parameters()}
    names = list(params)

    def fn(e, *values):
        return torch.func.functional_call(
            loss, dict(zip(names, values, strict=True)), (e, LABELS)
        ).loss

    assert torch.autograd.gradcheck(lambda e: fn(e, *params.values()), (embeddings,), atol=1e-6)
    # All ~140 inputs at once: fast mode checks a random projection of the Jacobian.
    inputs = (embeddings, *params.values())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5])])
def test_no_positive_pair_or_no_negative_gives_attached_zero(labels):
    loss = PDDMLoss(4, 5).double()
    embeddings = _features(4, 4, seed=40).requires_grad_(True)
    out = loss(embeddings, labels)
    assert out.loss.item() == 0.0 and out.stats["quadruplets"] == 0
    out.loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
    assert all(p.grad is not None for p in loss.parameters())


def test_float32_matches_float64():
    loss = PDDMLoss(4, 5, quadruplets="per_positive_pair").double()
    embeddings = _features(7, 4, seed=50)
    expected = loss(embeddings, LABELS).loss.item()
    assert loss.float()(embeddings.float(), LABELS).loss.item() == pytest.approx(expected, abs=1e-5)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="quadruplets"):
        PDDMLoss(4, quadruplets="all")
    with pytest.raises(ValueError, match="negatives"):
        PDDMLoss(4, negatives="easy")
