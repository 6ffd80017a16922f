"""Evaluation spread over the ranks: each rank embeds its share of each evaluation split (Ray
Train deals every split out whole, `training.ingest`), with rank 0's model, and rank 0 merges
the shares into the images one process would have embedded, in id order, and computes the
metrics from them."""

from __future__ import annotations

import numpy as np

from pipeline.data.decoding import ReplayCache
from pipeline.distributed import (
    all_gather_objects,
    all_ranks_true,
    buffers_from_rank0,
    receive_on_rank0,
    send_to_rank0,
    world,
)
from pipeline.evaluation.gather import id_order, rows_in_place
from pipeline.training.evaluate import embed_batches


class EvalShard:
    """This rank's share of one evaluation split: streamed from Ray Data the first time, then
    replayed from memory if every rank's share fits in `eval.cache_max_mb` (the eval transform
    is deterministic)."""

    def __init__(self, eval_config, dataset: str = "test"):
        """dataset: the Ray Train dataset's name ('test', 'gallery' or 'seen')."""
        self.eval_config = eval_config
        self.dataset = dataset
        self.cache: ReplayCache | None = ReplayCache(eval_config.cache_max_mb * 2**20)
        """None once the ranks found that not every share fits: then every pass streams."""
        self.agreed = False
        """Whether the ranks have settled, after the first pass, to replay or to stream."""

    def embed(self, model, device, autocast_dtype=None):
        """Every rank: embed this rank's share. Rank 0 gets the whole split's (embeddings,
        labels, ids) in id order, the other ranks None."""
        batches = self._stream() if self.cache is None else self.cache.batches(self._stream)
        share = embed_batches(model, batches, device, autocast_dtype)
        if not self.agreed:
            # A pass over the split starts only once every rank reads its share (Ray Data's
            # streaming split waits for all of them), so a rank that replayed its kept share
            # while another streamed would leave that one waiting for good: the shares are
            # replayed only if every one of them was kept.
            self.agreed = True
            if not all_ranks_true(self.cache.kept is not None, device):
                self.cache = None  # (a cache of limit 0 would still keep an empty share)
        return merge_on_rank0(share, self.dataset)

    def _stream(self):
        import ray.train

        return ray.train.get_dataset_shard(self.dataset).iter_batches(
            batch_size=self.eval_config.batch_size, batch_format="numpy"
        )


def merge_on_rank0(share, split: str = "test"):
    """Every rank: give its share = (embeddings, labels, ids) of a split. Rank 0 gets the whole
    split's (embeddings, labels, ids) in id order, the other ranks None (a collective).

    Only ids and labels are gathered everywhere (16 bytes a row). Every rank then finds the
    order, and so the same error if an id came twice or the shares' rows differ in shape or
    type, before any embedding is sent. Rank 0 writes each rank's embeddings straight into
    their places, taking one rank's at a time: beside its own share it holds the merged split
    and one other rank's share, where gathering the pickled shares took three times the split
    (benchmarks/eval_gather.py)."""
    embeddings, labels, ids = share
    heads = all_gather_objects((labels, ids, embeddings.shape[1:], embeddings.dtype.str))
    sending = [rank for rank, (_, rank_ids, _, _) in enumerate(heads) if len(rank_ids)]
    if not sending:
        raise ValueError(f"the {split} split reached no rank: it has no images")
    rank, _ = world()
    if sending == [0] and (np.diff(heads[0][1]) > 0).all():  # only rank 0's, in id order already
        return share if rank == 0 else None
    merged_ids, places = id_order([heads[r][1] for r in sending], split)
    row_shape, dtype = heads[sending[0]][2:]
    if any(heads[r][2:] != (row_shape, dtype) for r in sending):  # rank 0 could not take them
        kinds = {r: f"{heads[r][3]} rows of shape {heads[r][2]}" for r in sending}
        raise RuntimeError(f"the ranks embedded the {split} split differently: {kinds}")
    if rank != 0:
        if len(ids):
            send_to_rank0(embeddings)
        return None
    # A generator: each other rank's share is received only when its turn comes.
    placed = ((where, embeddings, labels) if sender == 0
              else (where, receive_on_rank0(sender, (len(heads[sender][1]), *row_shape), dtype), heads[sender][0])
              for sender, where in zip(sending, places, strict=True))
    return *rows_in_place(len(merged_ids), placed), merged_ids


class EvalSplits:
    """This rank's shares of a run's evaluation splits: the test split, the gallery its images
    are ranked against (In-Shop), and the training split when part of it is held out for the
    seen-class accuracy."""

    def __init__(self, test: EvalShard, gallery: EvalShard | None = None, seen: EvalShard | None = None):
        self.test = test
        self.gallery = gallery
        self.seen = seen

    @classmethod
    def for_run(cls, eval_config, plan) -> EvalSplits:
        """The splits a run's plan (`RunPlan`) evaluates on."""
        return cls(
            EvalShard(eval_config, "test"),
            EvalShard(eval_config, "gallery") if plan.gallery_split else None,
            EvalShard(eval_config, "seen") if plan.has_seen_holdout else None,
        )

    def embed(self, model, device, autocast_dtype=None) -> tuple:
        """Every rank: embed its shares with `model` as rank 0 holds it (the model its checkpoint
        saves). Rank 0 gets (test, gallery, seen), each the whole split's (embeddings, labels,
        ids) or None when the run has no such split; the other ranks (None, None, None)."""
        buffers_from_rank0(model)
        return tuple(
            None if split is None else split.embed(model, device, autocast_dtype)
            for split in (self.test, self.gallery, self.seen)
        )
