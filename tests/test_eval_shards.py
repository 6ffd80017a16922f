"""Evaluation spread over the ranks gives what one process gives.

- Ray Train deals each evaluation split out whole (`RunDataConfig`): every row reaches exactly
  one rank, where Ray's own equal split drops the rows that do not divide.
- Ranks that embed uneven shares (one of them empty) with BatchNorm statistics of their own
  (as under DDP) and merge them on rank 0 (3 gloo processes) get rank 0's model's embeddings,
  metrics and seen-class accuracy as one process computes them, at every evaluation, whether
  the shares are replayed from memory or streamed again.
"""

from __future__ import annotations

import os
import pickle
import threading
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from server_process import free_port

from pipeline import distributed
from pipeline.config import load_config
from pipeline.data.decoding import ReplayCache
from pipeline.evaluation.gather import merge_shares
from pipeline.training.eval_shards import EvalShard, EvalSplits, merge_on_rank0
from pipeline.training.evaluate import embed_batches, retrieval_metrics_of, seen_knn_accuracy

WORLD = 3
N = 150
EVALUATIONS = 3
HOLDOUT = np.arange(0, N, 7)


def _images():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, N)
    pixels = rng.integers(0, 256, (N, 3, 12, 12), dtype=np.uint8)
    return pixels, labels


def _batches(ids: np.ndarray) -> list[dict]:
    pixels, labels = _images()
    return [{"image": pixels[c], "label": labels[c], "id": c} for c in np.array_split(ids, max(1, len(ids) // 16))]


def _shares() -> list[np.ndarray]:
    """Uneven shares of the ids in a shuffled order, as a streaming split deals blocks; the
    last rank gets none."""
    order = np.random.default_rng(9).permutation(N)
    return [order[:100], order[100:], order[:0]]


def _model(rank: int = 0):
    """A small net with BatchNorm, in eval mode. Its running statistics differ by rank, as
    they do under DDP after a training step; rank 0's are the ones one process would use."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 8),
    )
    with torch.no_grad():
        model[1].running_mean.add_(0.1 * rank)
        model[1].running_var.mul_(1.0 + rank)
    return model.eval()


def _eval_config():
    return load_config("local", ["eval.recall_ks=[1, 2, 4]", "eval.nmi=true"]).eval


class _FixedShard(EvalShard):
    """An EvalShard whose share comes from a list instead of Ray Train (counting the passes)."""

    def __init__(self, eval_config, batches, limit_bytes):
        super().__init__(eval_config, "test")
        self.cache = ReplayCache(limit_bytes)
        self.share_batches = batches
        self.streamed = 0

    def _stream(self):
        self.streamed += 1
        return iter(self.share_batches)


def _rank_main(rank: int, port: int, out_dir: str, limits: list[int]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, config = _model(rank), _eval_config()
        ids = _shares()[rank]
        # The same images stand for the test split and the training split ('seen').
        test, seen = (_FixedShard(config, _batches(ids) if len(ids) else [], limits[rank]) for _ in range(2))
        splits = EvalSplits(test, seen=seen)
        results = []
        for _ in range(EVALUATIONS):
            test, gallery, seen = splits.embed(model, torch.device("cpu"))
            assert gallery is None
            if rank == 0:
                results.append((
                    test,
                    retrieval_metrics_of(test, config, use_gpu=False),
                    seen_knn_accuracy(seen, HOLDOUT, config, use_gpu=False),
                ))
            else:
                assert test is None and seen is None, "a rank other than 0 got a merged split"
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
            pickle.dump({
                "results": results, "streamed": [splits.test.streamed, splits.seen.streamed],
            }, handle)
    finally:
        dist.destroy_process_group()



def _run_ranks(tmp_path, limits):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path), limits), nprocs=WORLD, join=True)
    out = []
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as handle:
            out.append(pickle.load(handle))
    return out


@pytest.mark.parametrize("kept", ["every share kept", "one share too big to keep"])
def test_ranks_sharing_an_evaluation_match_one_process(tmp_path, kept):
    big = 2**30
    limits = [big, big, big] if kept == "every share kept" else [big, 0, big]
    ranks = _run_ranks(tmp_path, limits)

    model, config = _model(), _eval_config()
    embeddings, labels, ids = embedded = embed_batches(model, _batches(np.arange(N)), torch.device("cpu"))
    metrics = retrieval_metrics_of(embedded, config, use_gpu=False)
    accuracy = seen_knn_accuracy(embedded, HOLDOUT, config, use_gpu=False)
    assert 0.0 < metrics["recall@1"] < 1.0 and 0.0 < accuracy < 1.0  # not a degenerate comparison

    assert len(ranks[0]["results"]) == EVALUATIONS
    for (got_embeddings, got_labels, got_ids), got_metrics, got_accuracy in ranks[0]["results"]:
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_allclose(got_embeddings, embeddings, rtol=0, atol=1e-5)
        assert got_metrics == pytest.approx(metrics, abs=1e-6)
        assert got_accuracy == pytest.approx(accuracy)
    # Kept shares are replayed only when every rank kept its own: a rank replaying while
    # another streams would leave the other waiting at Ray Data's split for good.
    passes = 1 if kept == "every share kept" else EVALUATIONS
    assert [r["streamed"] for r in ranks] == [[passes, passes]] * WORLD


def _share(ids, dim: int = 2) -> tuple:
    ids = np.asarray(ids, np.int64)
    if not len(ids):  # what embed_batches returns for an empty share
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int32), ids
    embeddings = np.stack([ids * 1.5, -ids.astype(np.float32), *[ids] * (dim - 2)], axis=1).astype(np.float32)
    return embeddings, (ids % 4).astype(np.int32), ids


MERGE_CASES = {  # name: each rank's ids (the merged split is expected in id order)
    "rank 0 alone, in order": [[0, 1, 2, 5], [], []],
    "rank 0 alone, out of order": [[5, 0, 2], [], []],
    "rank 2 alone, out of order": [[], [], [9, 3, 4]],
    "every rank": [[7, 0], [1, 5, 2], [3]],
    "an id on two ranks": [[0, 1], [2, 3], [3, 4]],
    "an id twice on rank 0": [[6, 6], [], []],
    "no rank": [[], [], []],
    "rows of another shape on rank 1": [[0], [1], []],
}
FAILS = {
    "an id on two ranks": "RuntimeError: the seen split's images came more than once: ids [3]",
    "an id twice on rank 0": "RuntimeError: the seen split's images came more than once: ids [6]",
    "no rank": "ValueError: the seen split reached no rank: it has no images",
    "rows of another shape on rank 1": "RuntimeError: the ranks embedded the seen split differently: "
                                       "{0: '<f4 rows of shape (2,)', 1: '<f4 rows of shape (3,)'}",
}


def _merge_main(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A send that rank 0 never takes fails the test within a minute instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    got = {}
    try:
        # Over the default group (gloo), then over a gloo group of its own, as beside NCCL on
        # GPUs (the backend is only named NCCL here: the real one needs a GPU per rank).
        for group in ("default", "own"):
            if group == "own":
                distributed.dist = SimpleNamespace(**{**vars(dist), "get_backend": lambda *_: "nccl"})
            # One case after another in one process group: a case that raised must leave the
            # ranks in step (no embedding sent that rank 0 never takes) for the next to work.
            for name, ranks_ids in MERGE_CASES.items():
                dim = 3 if name == "rows of another shape on rank 1" and rank == 1 else 2
                try:
                    got[group, name] = merge_on_rank0(_share(ranks_ids[rank], dim), "seen")
                except (ValueError, RuntimeError) as error:
                    got[group, name] = f"{type(error).__name__}: {error}"
        got["own group made"] = distributed._HOST_GROUP is not None
        with open(os.path.join(out_dir, f"merge{rank}.pkl"), "wb") as handle:
            pickle.dump(got, handle)
    finally:
        distributed.dist = dist
        dist.destroy_process_group()


def test_merging_on_rank0_with_empty_shares_or_an_id_twice(tmp_path):
    mp.spawn(_merge_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = []
    for rank in range(WORLD):
        with open(tmp_path / f"merge{rank}.pkl", "rb") as handle:
            ranks.append(pickle.load(handle))
    assert [r["own group made"] for r in ranks] == [True] * WORLD
    for group in ("default", "own"):
        for name, ranks_ids in MERGE_CASES.items():
            if name in FAILS:  # every rank raises, before anything is sent
                assert [r[group, name] for r in ranks] == [FAILS[name]] * WORLD, (group, name)
                continue
            assert [r[group, name] for r in ranks[1:]] == [None, None], (group, name)
            embeddings, labels, ids = _share(sorted(sum(ranks_ids, [])))
            got_embeddings, got_labels, got_ids = ranks[0][group, name]
            np.testing.assert_array_equal(got_ids, ids)
            np.testing.assert_array_equal(got_labels, labels)
            np.testing.assert_array_equal(got_embeddings, embeddings)
            assert (got_embeddings.dtype, got_labels.dtype) == (np.float32, np.int32), (group, name)


def test_merging_refuses_overlapping_or_empty_shares():
    share = (np.ones((2, 4), np.float32), np.array([0, 1]), np.array([3, 4]))
    empty = (np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    embeddings, labels, ids = merge_shares([share, empty, (share[0], share[1], np.array([1, 2]))])
    np.testing.assert_array_equal(ids, [1, 2, 3, 4])
    with pytest.raises(RuntimeError, match=r"images came more than once: ids \[4\]"):
        merge_shares([share, (share[0], share[1], np.array([4, 5]))])
    with pytest.raises(ValueError, match="the seen split reached no rank"):
        merge_shares([empty, empty], "seen")


@pytest.mark.ray
def test_every_evaluation_row_reaches_exactly_one_rank(ray_local):
    import ray
    import ray.train

    from pipeline.training.ingest import RunDataConfig

    def read_all(shares, name):
        got: dict[int, list[int]] = {}

        def read(rank):  # the ranks read at once: a streaming split starts a pass for all of them
            got[rank] = [int(i) for b in shares[rank][name].iter_batches(batch_size=4) for i in b["id"]]

        threads = [threading.Thread(target=read, args=(rank,), daemon=True) for rank in range(len(shares))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        return got

    rows = 13  # does not divide by 3 ranks
    dataset = ray.data.from_items([{"id": i} for i in range(rows)], override_num_blocks=5)
    ours = RunDataConfig(datasets_to_split=["train"])
    here = ray.get_runtime_context().get_node_id()  # Ray Train passes the ranks' nodes as hints
    for name in ("test", "gallery", "seen"):
        shares = ours.configure({name: dataset}, world_size=3, worker_handles=None, worker_node_ids=[here] * 3)
        for _ in range(2):  # two evaluations
            got = read_all(shares, name)
            assert sorted(sum(got.values(), [])) == list(range(rows)), f"{name}: {got}"
            assert sum(1 for ids in got.values() if ids) > 1, f"{name} was not shared out: {got}"
    # The training stream is still Ray's equal split: every rank the same number of rows.
    train = read_all(ours.configure({"train": dataset}, world_size=3, worker_handles=None, worker_node_ids=None),
                     "train")
    assert len({len(ids) for ids in train.values()}) == 1
    # Why the evaluation splits need their own split: Ray's drops a row here.
    theirs = ray.train.DataConfig(datasets_to_split=["test"]).configure(
        {"test": dataset}, world_size=3, worker_handles=None, worker_node_ids=None
    )
    assert len(sum(read_all(theirs, "test").values(), [])) < rows
    # One rank reads the whole split.
    [whole] = ours.configure({"test": dataset}, world_size=1, worker_handles=None, worker_node_ids=None)
    assert sorted(int(i) for b in whole["test"].iter_batches(batch_size=4) for i in b["id"]) == list(range(rows))
