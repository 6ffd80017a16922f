"""The seen-class kNN accuracy: against a float64 brute-force vote, by hand, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.evaluation.metrics import knn_accuracy
from pipeline.training.evaluate import embed_batches, seen_knn_accuracy


def reference_accuracy(queries, q_labels, gallery, g_labels, k):
    """Full float64 distance matrix, stable sort, a dict of votes; a tie goes to the label
    whose first vote came first (the nearest)."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    distances = ((q[:, None, :] - g[None, :, :]) ** 2).sum(axis=2)
    correct = 0
    for i in range(len(q)):
        votes: dict[int, int] = {}
        for j in np.argsort(distances[i], kind="stable")[:k]:
            votes[int(g_labels[j])] = votes.get(int(g_labels[j]), 0) + 1
        best = max(votes.values())
        predicted = next(label for label, count in votes.items() if count == best)  # insertion order
        correct += predicted == q_labels[i]
    return correct / len(q)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 50])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_reference(k, chunk):
    rng = np.random.default_rng(k * 100 + chunk)
    # Classes overlap, so votes disagree and ties happen at even k.
    g_labels = rng.integers(0, 4, 40)
    gallery = (rng.normal(size=(40, 3)) + g_labels[:, None]).astype(np.float32)
    q_labels = rng.integers(0, 4, 25)
    queries = (rng.normal(size=(25, 3)) + q_labels[:, None]).astype(np.float32)
    expected = reference_accuracy(queries, q_labels, gallery, g_labels, k)
    got = knn_accuracy(queries, q_labels, gallery, g_labels, k=k, query_chunk_size=chunk)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got < 1.0  # neither trivial nor hopeless: the vote is what is tested


def test_by_hand():
    # Gallery on a line: 0 (class 0), 1 (class 1), 2 (class 1), 10 (class 2).
    gallery = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    g_labels = np.array([0, 1, 1, 2])
    queries = np.array([[0.4], [0.4], [9.0]], np.float32)
    q_labels = np.array([0, 1, 2])
    # k=1: nearest of 0.4 is 0 (class 0); of 9.0 is 10 (class 2): right, wrong, right.
    assert knn_accuracy(queries, q_labels, gallery, g_labels, k=1) == pytest.approx(2 / 3)
    # k=2: 0.4 sees classes 0 and 1 once each, a tie won by the nearer (class 0); 9.0 sees 10
    # (class 2) and 2 (class 1), again a tie won by class 2.
    assert knn_accuracy(queries, q_labels, gallery, g_labels, k=2) == pytest.approx(2 / 3)
    # k=3: 0.4 sees 0, 1, 2 -> class 1 wins 2:1, so the first query is now wrong and the
    # second right; 9.0 sees 10, 2, 1 -> class 1 wins.
    assert knn_accuracy(queries, q_labels, gallery, g_labels, k=3) == pytest.approx(1 / 3)
    # k past the gallery size votes over the whole gallery (class 1 for every query).
    assert knn_accuracy(queries, q_labels, gallery, g_labels, k=100) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "k must be >= 1"), ({"query_chunk_size": 0}, "query_chunk_size")],
)
def test_bad_arguments(kwargs, message):
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=message):
        knn_accuracy(x, np.arange(3), x, np.arange(3), **kwargs)


def test_seen_accuracy_classifies_the_held_out_ids_against_the_rest():
    # An identity "model" on 1-pixel images: the embedding is the pixel value.
    ids = np.arange(6)
    labels = np.array([0, 0, 0, 1, 1, 1])
    pixels = np.array([0, 10, 250, 200, 210, 5], np.uint8)  # id 2 looks like class 1, id 5 like 0
    batches = [{"image": pixels[s].reshape(-1, 1, 1, 1), "label": labels[s], "id": ids[s]}
               for s in (slice(0, 4), slice(4, 6))]
    model = torch.nn.Flatten()
    eval_config = load_config("local", []).eval
    # Held out: id 1 (near id 0, right) and id 5 (near id 0, wrong).
    embedded = embed_batches(model, batches, torch.device("cpu"))
    assert seen_knn_accuracy(embedded, np.array([1, 5]), eval_config, use_gpu=False) == 0.5
    # Held out: id 2 (near id 3, class 1: wrong) and id 4 (near id 3: right).
    assert seen_knn_accuracy(embedded, np.array([2, 4]), eval_config, use_gpu=False) == 0.5
    with pytest.raises(ValueError, match="held-out images"):
        seen_knn_accuracy(embedded, np.array([], np.int64), eval_config, use_gpu=False)
