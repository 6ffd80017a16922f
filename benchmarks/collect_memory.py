"""The memory a process takes to gather an embedded split from Ray's object store, as
`jobs.evaluate`'s metrics task and `jobs.export_embeddings` do (`collect_embeddings`).

    python benchmarks/collect_memory.py                         # 1M x 512 float32 (2 GiB), 64 blocks
    python benchmarks/collect_memory.py --rows 1000000 --dim 128

A local Ray holds a materialized dataset of `--rows` random embeddings with labels and ids,
in `--blocks` blocks whose ids were dealt out in a random order (as the embedding actors
return them). Two paths gather it in id order, each in a fresh process of its own (a process
that had already freed the same bytes could reuse them unseen):

- `collect_embeddings` (pipeline/serving/embedding.py): the ids first, then each block written
  into its place and let go;
- `concat_sort`: what fa67aaa and earlier did, kept here as the baseline: every block read,
  concatenated and sorted by id.

Each prints one JSON line: the peak rise of the process's private (anonymous) resident memory
while it gathers, sampled every millisecond, in MiB and in multiples of the split's bytes,
and the seconds it took. Private memory, since the blocks themselves sit in Ray's shared
object store whichever path reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_memory  # noqa: E402

PATHS = ("collect_embeddings", "concat_sort")


def private_bytes() -> int:
    """This process's anonymous (private) resident bytes: the heap, not the shared object store."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _concat_sort(dataset):
    """The gather of fa67aaa: every block read, concatenated and sorted by id."""
    import pyarrow as pa

    from pipeline.serving.embedding import embedding_matrix

    table = pa.concat_tables(list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))).sort_by("id")
    return table.column("id").to_numpy(), table.column("label").to_numpy(), embedding_matrix(table)


def measure(path: str, rows: int, dim: int, blocks: int) -> dict:
    """Gather a made-up split by `path` in this process; what it took."""
    import ray

    from pipeline.serving.embedding import collect_embeddings, embeddings_table

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=3 * rows * dim * 4 + 2**28)
    try:
        dealt = np.random.default_rng(0).permutation(rows)

        def make(batch):
            ids = dealt[batch["id"]]
            embeddings = np.random.default_rng(int(ids[0])).standard_normal((len(ids), dim), dtype=np.float32)
            return embeddings_table(ids, ids % 100, embeddings)

        dataset = ray.data.range(rows, override_num_blocks=blocks).map_batches(make, batch_size=None).materialize()
        gather = collect_embeddings if path == "collect_embeddings" else _concat_sort
        decode_memory.resident_bytes = private_bytes  # peak_rise samples this
        start = time.perf_counter()
        rise, (ids, _, embeddings) = decode_memory.peak_rise(lambda: gather(dataset))
        seconds = time.perf_counter() - start
        if not (len(ids) == rows and (np.diff(ids) > 0).all()):
            raise AssertionError(f"{path} did not return every id once, in order")
        split = embeddings.nbytes
    finally:
        ray.shutdown()
    return {"path": path, "rows": rows, "dim": dim, "blocks": blocks, "split_mib": round(split / 2**20),
            "peak_rise_mib": round(rise / 2**20), "x_split": round(rise / split, 2), "seconds": round(seconds, 2),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process's path
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.rows, args.dim, args.blocks)), flush=True)
        return
    for path in args.paths.split(","):
        if path not in PATHS:
            raise SystemExit(f"--paths: {path!r} is not one of {', '.join(PATHS)}")
        subprocess.run([sys.executable, __file__, "--one", path, "--rows", str(args.rows), "--dim", str(args.dim),
                        "--blocks", str(args.blocks)], check=True)


if __name__ == "__main__":
    main()
