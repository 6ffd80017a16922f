"""Time `retrieval_metrics` on random clustered embeddings; prints one line of JSON.

Example: python benchmarks/eval_metrics.py --num 100000 --dim 128 --classes 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import faiss
import numpy as np

from pipeline.evaluation import kmeans_nmi, retrieval_metrics


def clustered_embeddings(num: int, dim: int, classes: int, noise: float, seed: int = 0):
    """L2-normalised points around random class centres, like a trained embedding."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=num)
    centres = rng.standard_normal(size=(classes, dim), dtype=np.float32)
    # In place and float32 throughout, so the data's own peak does not hide the metric's.
    embeddings = rng.standard_normal(size=(num, dim), dtype=np.float32)
    embeddings *= noise
    embeddings += centres[labels]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, labels


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time the ranking metrics and NMI separately, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100_000, help="number of embeddings")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes")
    parser.add_argument(
        "--noise", type=float, default=1.5, help="within-class spread (centres have unit scale)"
    )
    parser.add_argument("--chunk", type=int, default=4096, help="query_chunk_size")
    parser.add_argument("--gpu", action="store_true", help="use faiss GPU index and k-means")
    parser.add_argument("--no-nmi", action="store_true", help="skip the k-means NMI part")
    args = parser.parse_args(argv)

    rss_after_imports = peak_rss_mib()
    start = time.perf_counter()
    embeddings, labels = clustered_embeddings(args.num, args.dim, args.classes, args.noise)
    data_seconds = time.perf_counter() - start
    rss_after_data = peak_rss_mib()

    # Ranking metrics and NMI are timed apart: they scale differently (N^2 D vs N C D iters).
    start = time.perf_counter()
    metrics = retrieval_metrics(
        embeddings, labels, query_chunk_size=args.chunk, compute_nmi=False, use_gpu=args.gpu
    )
    ranking_seconds = time.perf_counter() - start
    rss_after_ranking = peak_rss_mib()

    nmi_seconds = None
    if not args.no_nmi:
        start = time.perf_counter()
        metrics["nmi"] = kmeans_nmi(embeddings, labels, use_gpu=args.gpu)
        nmi_seconds = time.perf_counter() - start

    report = {
        "num": args.num,
        "dim": args.dim,
        "classes": args.classes,
        "noise": args.noise,
        "chunk": args.chunk,
        "gpu": args.gpu,
        "faiss_threads": faiss.omp_get_max_threads(),
        "seconds_data": round(data_seconds, 3),
        "seconds_ranking": round(ranking_seconds, 3),
        "seconds_nmi": None if nmi_seconds is None else round(nmi_seconds, 3),
        "seconds_total": round(ranking_seconds + (nmi_seconds or 0.0), 3),
        "peak_rss_mib_after_imports": round(rss_after_imports, 1),
        "peak_rss_mib_after_data": round(rss_after_data, 1),
        "peak_rss_mib_after_ranking": round(rss_after_ranking, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "metrics": {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
    }
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
