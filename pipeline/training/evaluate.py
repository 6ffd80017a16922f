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
    parts = [
        (out, np.asarray(batch["label"]), np.asarray(batch["id"]))
        for batch, out in embed_rows(model, batches, device, lambda batch: batch["image"], autocast_dtype)
    ]
    model.train(was_training)
    if not parts:  # a rank's share of a small split may be empty
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return merge_shares(parts)


def merge_shares(shares, split: str = "test"):
    """One (embeddings, labels, ids) in id order from pieces of a split, each an (embeddings,
    labels, ids) (a rank's embedded batches): what one process embedding them in any order
    gets. Raises if an id came twice or no piece has images. (The ranks' shares meet on rank 0
    through `eval_shards.merge_on_rank0`, one share at a time.)"""
    shares = [share for share in shares if len(share[2])]
    if not shares:
        raise ValueError(f"the {split} split reached no rank: it has no images")
    if len(shares) == 1 and (np.diff(shares[0][2]) > 0).all():  # one piece, in id order already
        return shares[0]
    ids, places = id_order([share[2] for share in shares], split)
    placed = ((where, share[0], share[1]) for where, share in zip(places, shares, strict=True))
    return *rows_in_place(len(ids), placed), ids


def id_order(id_pieces: list[np.ndarray], split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(every id in order, where each piece's rows go in that order): the rows are then written
    straight into their places, with no concatenated copy of the pieces to sort. Raises if an
    id came twice."""
    ids = np.concatenate(id_pieces)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    _refuse_repeats(ids, split)
    places = np.empty_like(order)
    places[order] = np.arange(len(order))
    return ids, np.split(places, np.cumsum([len(piece) for piece in id_pieces])[:-1])


def sorted_ids(id_pieces: list[np.ndarray], split: str) -> np.ndarray:
    """Every id of the pieces, in order (`id_order` without the places). Raises if an id came
    twice."""
    ids = np.sort(np.concatenate(id_pieces))
    _refuse_repeats(ids, split)
    return ids


def _refuse_repeats(ids: np.ndarray, split: str) -> None:
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        raise RuntimeError(f"the {split} split's images came more than once: ids {repeated[:5].tolist()}")


def rows_in_place(count: int, placed) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels) of a whole split of `count` rows in id order: `placed` yields each
    piece as (where its rows go, its embeddings, its labels), and is consumed one piece at a
    time, so a generator that fetches each piece keeps only one of them alive beside the
    result (rank 0's received shares, the blocks of an embedded dataset)."""
    embeddings = labels = None
    for where, piece_embeddings, piece_labels in placed:
        if embeddings is None:
            embeddings = np.empty((count, *piece_embeddings.shape[1:]), piece_embeddings.dtype)
            labels = np.empty(count, piece_labels.dtype)
        embeddings[where] = piece_embeddings
        labels[where] = piece_labels
        del piece_embeddings, piece_labels  # before the next piece is fetched
    return embeddings, labels


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
