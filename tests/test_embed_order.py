"""Evaluation does not depend on the order Ray Data delivers the test batches in: embeddings
come back in id order, so k-means (NMI) starts from the same points and the ranking breaks
ties the same way in every run (no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.training.evaluate import embed_batches, retrieval_metrics_of


def _batches(order: np.ndarray, pixels: np.ndarray, labels: np.ndarray, size: int) -> list[dict]:
    return [
        {"image": pixels[chunk], "label": labels[chunk], "id": chunk}
        for chunk in np.array_split(order, len(order) // size)
    ]


def test_metrics_and_embeddings_do_not_depend_on_the_batch_order():
    rng = np.random.default_rng(0)
    n = 240
    labels = rng.integers(0, 12, n)
    pixels = rng.integers(0, 256, (n, 1, 2, 4), dtype=np.uint8)  # the embedding is the 8 pixels
    model = torch.nn.Flatten()
    eval_config = load_config("local", ["eval.nmi=true", "eval.recall_ks=[1, 2, 4]"]).eval
    results = []
    for order in (rng.permutation(n), rng.permutation(n)):
        embedded = embed_batches(model, _batches(order, pixels, labels, 16), torch.device("cpu"))
        metrics = retrieval_metrics_of(embedded, eval_config, use_gpu=False)
        embeddings, got_labels, ids = embedded
        np.testing.assert_array_equal(ids, np.arange(n))
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(embeddings, pixels.reshape(n, -1) / np.float32(255))
        results.append(metrics)
    assert results[0] == results[1]
