"""Embed a split and compute the field's retrieval metrics."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.device_feed import embed_rows
from pipeline.evaluation.gather import merge_shares
from pipeline.evaluation.metrics import knn_accuracy, retrieval_metrics


@torch.no_grad()
def embed_batches(model: torch.nn.Module, batches, device: torch.device, autocast_dtype=None):
    """Embeddings, labels and ids of every image an iterator of decoded batches yields, in id
    order: Ray Data delivers the batches in any order, and k-means (NMI) and the ranking's ties
    follow the order of the points."""
    was_training = model.training
    model.eval()
    parts = [
        (out, np.asarray(batch["label"]), np.asarray(batch["id"]))
        for batch, out in embed_rows(model, batches, device, lambda batch: batch["image"], autocast_dtype)
    ]
    model.train(was_training)
    if not parts:  # a rank's share of a small split may be empty
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return merge_shares(parts)


def retrieval_metrics_of(embedded, eval_config, use_gpu: bool, gallery=None) -> dict[str, float]:
    """The retrieval metrics of embedded = (embeddings, labels, ids), ranked against each other
    or, with `gallery` (the same triple), against the gallery."""
    embeddings, labels, _ = embedded
    metrics = retrieval_metrics(
        embeddings,
        labels,
        *(() if gallery is None else gallery[:2]),
        ks=tuple(eval_config.recall_ks),
        compute_nmi=eval_config.nmi,
        use_gpu=use_gpu,
    )
    return {k: float(v) for k, v in metrics.items()}


def seen_knn_accuracy(embedded, holdout_ids, eval_config, use_gpu: bool) -> float:
    """kNN classification accuracy on the seen classes: `embedded` = (embeddings, labels, ids)
    of the whole training split; the images whose ids are in `holdout_ids` (never trained on)
    are classified by a vote of their `eval.seen_knn_k` nearest neighbours among the others."""
    embeddings, labels, ids = embedded
    held = np.isin(ids, holdout_ids)
    if not held.any() or held.all():
        raise ValueError(
            f"the seen-class split has {int(held.sum())} held-out images of {len(ids)}: "
            "need some held out and some trained on"
        )
    return knn_accuracy(
        embeddings[held], labels[held], embeddings[~held], labels[~held],
        k=eval_config.seen_knn_k, use_gpu=use_gpu,
    )
