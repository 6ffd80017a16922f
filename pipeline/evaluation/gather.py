"""Put a split's embeddings together in id order from the pieces they were embedded in: a
rank's batches, the ranks' shares on rank 0, the blocks of an embedded Ray dataset. Ray Data
delivers rows in any order, and k-means (NMI) and the ranking's ties follow the order of the
points, so every gather writes each piece's rows straight into their places by id, holding the
split once, not once more in a concatenated copy to sort."""

from __future__ import annotations

import numpy as np


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
