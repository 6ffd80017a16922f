"""Embed a split and compute the field's retrieval metrics."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.device_feed import embed_rows
from pipeline.evaluation.metrics import knn_accuracy, retrieval_metrics


@torch.no_grad()
def embed_batches(model: torch.nn.Module, batches, device: torch.device, autocast_dtype=None):
    """Embeddings, labels and ids of every image an iterator of decoded batches yields, in id
    order: Ray Data delivers the batches in any order, and k-means (NMI) and the ranking's ties
    follow the order of the points."""
    was_training = model.training
    model.eval()
    embeddings, labels, ids = [], [], []
    for batch, out in embed_rows(model, batches, device, lambda batch: batch["image"], autocast_dtype):
        embeddings.append(out)
        labels.append(np.asarray(batch["label"]))
        ids.append(np.asarray(batch["id"]))
    model.train(was_training)
    ids = np.concatenate(ids)
    order = np.argsort(ids, kind="stable")
    return np.concatenate(embeddings)[order], np.concatenate(labels)[order], ids[order]


def evaluate_retrieval(
    model, batches, device, eval_config, autocast_dtype=None, gallery_batches=None
) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision and NMI of the model on the images `batches` yields (queries
    ranked against `gallery_batches`' images when given, else against each other)."""
    return embed_and_evaluate(
        model, batches, device, eval_config, autocast_dtype, gallery_batches
    )[0]


def embed_and_evaluate(model, batches, device, eval_config, autocast_dtype=None, gallery_batches=None):
    """`evaluate_retrieval`'s metrics and the (embeddings, labels, ids) they come from; with
    `gallery_batches` (In-Shop) each image `batches` yields is a query ranked against those."""
    embeddings, labels, ids = embed_batches(model, batches, device, autocast_dtype)
    gallery = ()
    if gallery_batches is not None:
        gallery = embed_batches(model, gallery_batches, device, autocast_dtype)[:2]
    metrics = retrieval_metrics(
        embeddings,
        labels,
        *gallery,
        ks=tuple(eval_config.recall_ks),
        compute_nmi=eval_config.nmi,
        use_gpu=device.type == "cuda",
    )
    return {k: float(v) for k, v in metrics.items()}, (embeddings, labels, ids)


def seen_knn_accuracy(model, batches, holdout_ids, device, eval_config, autocast_dtype=None) -> float:
    """kNN classification accuracy on the seen classes: `batches` yields the whole training
    split; the images whose ids are in `holdout_ids` (never trained on) are classified by a vote
    of their `eval.seen_knn_k` nearest neighbours among the others."""
    embeddings, labels, ids = embed_batches(model, batches, device, autocast_dtype)
    held = np.isin(ids, holdout_ids)
    if not held.any() or held.all():
        raise ValueError(
            f"the seen-class split has {int(held.sum())} held-out images of {len(ids)}: "
            "need some held out and some trained on"
        )
    return knn_accuracy(
        embeddings[held], labels[held], embeddings[~held], labels[~held],
        k=eval_config.seen_knn_k, use_gpu=device.type == "cuda",
    )
