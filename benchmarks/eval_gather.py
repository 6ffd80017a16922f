"""Rank 0's memory and time while the ranks' shares of an evaluation split meet on it.

    python benchmarks/eval_gather.py                           # 1M x 512 float32 (2 GiB) over 2 ranks
    python benchmarks/eval_gather.py --rows 1000000 --dim 128 --ranks 4

Each of `--ranks` gloo processes on this machine holds an equal share of `--rows` random
embeddings with their labels and ids (dealt out in a random order, as Ray Data's streaming
split deals blocks), and rank 0 merges them into the whole split in id order, by two paths:

- `merge_on_rank0` (pipeline/training/eval_shards.py): ids and labels gathered, then each
  rank's embeddings sent to rank 0, which writes them into their places one rank at a time;
- `pickled`: what 47a7e12 and earlier did, kept here as the baseline: every share pickled to
  rank 0 (`gather_object`), then concatenated and sorted.

Rank 0's resident set is sampled every millisecond (benchmarks/decode_memory.py). Prints one
JSON line per path: the peak rise of rank 0's resident set over its level with its own share
made, in MiB and in multiples of the merged split's bytes, and the seconds the merge took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_memory import peak_rise  # noqa: E402


def _pickled_merge(share):
    """The merge of 47a7e12: the pickled shares gathered whole on rank 0, concatenated, sorted."""
    received = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(share, received, dst=0)
    if received is None:
        return None
    ids = np.concatenate([s[2] for s in received])
    order = np.argsort(ids, kind="stable")
    embeddings = np.concatenate([s[0] for s in received])[order]
    return embeddings, np.concatenate([s[1] for s in received])[order], ids[order]


def _rank_main(rank: int, port: int, args, path: str, out_file: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    try:
        from pipeline.training.eval_shards import merge_on_rank0

        ids = np.array_split(np.random.default_rng(0).permutation(args.rows), args.ranks)[rank]
        ids.sort()  # embed_batches returns each rank's share in id order
        rng = np.random.default_rng(rank + 1)
        share = (rng.standard_normal((len(ids), args.dim), dtype=np.float32), ids % 1000, ids)
        merge = _pickled_merge if path == "pickled" else (lambda s: merge_on_rank0(s, "test"))
        dist.barrier()
        start = time.perf_counter()
        rise, merged = peak_rise(lambda: merge(share))
        seconds = time.perf_counter() - start
        dist.barrier()
        if rank == 0:
            assert len(merged[2]) == args.rows and (np.diff(merged[2]) > 0).all()
            split_bytes = merged[0].nbytes
            with open(out_file, "w") as handle:
                json.dump({
                    "path": path,
                    "ranks": args.ranks,
                    "rows": args.rows,
                    "dim": args.dim,
                    "split_mib": round(split_bytes / 2**20, 1),
                    "rank0_peak_rise_mib": round(rise / 2**20, 1),
                    "rank0_peak_rise_x_split": round(rise / split_bytes, 2),
                    "seconds": round(seconds, 2),
                }, handle)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="images in the split")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--ranks", type=int, default=2, help="gloo processes (Ray Train workers)")
    parser.add_argument("--paths", default="merge_on_rank0,pickled", help="comma-separated: merge_on_rank0, pickled")
    args = parser.parse_args()

    for path in args.paths.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rank0.json")
            mp.spawn(_rank_main, args=(_free_port(), args, path, out_file), nprocs=args.ranks, join=True)
            with open(out_file) as handle:
                report = json.load(handle)
        report.update(machine=f"{platform.node()} ({os.cpu_count()} CPUs)", torch=torch.__version__)
        print(json.dumps(report), flush=True)


def _free_port() -> int:
    """A free TCP port on this machine, for the gloo rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
