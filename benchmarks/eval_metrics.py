"""Time `retrieval_metrics` on random clustered embeddings; prints one line of JSON.

Example: python benchmarks/eval_metrics.py --num 100000 --dim 128 --classes 1000 --compare-pml

--compare-pml also runs pytorch-metric-learning's AccuracyCalculator on the same embeddings
(precision_at_1, mean_average_precision_at_r, r_precision, NMI) and reports both, their largest
difference, and each side's time and peak memory. --gpu-num N adds a run of N embeddings on the
GPU when one is visible (faiss-gpu, or torch's CUDA device where faiss has no GPU: see
pipeline/exact_search.py), with the GPU memory it peaked at, and says it was not run otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time

import faiss
import numpy as np

from pipeline.evaluation import DEFAULT_KS, kmeans_nmi, retrieval_metrics


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


class PeakRSS:
    """Highest resident set size of this process while the block runs (MiB), sampled every
    5 ms, and the size when it started: a phase's own peak, which ru_maxrss cannot give after
    an earlier, larger phase."""

    def __init__(self):
        self.start_mib = self.peak_mib = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as handle:  # Linux: pages; the second field is resident
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._rss())


# Our metric names and PML's for the same quantity.
PML_NAMES = {
    "recall@1": "precision_at_1",
    "map@r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
    "nmi": "NMI",
}


def ours_timed(embeddings, labels, chunk: int, gpu: bool) -> dict:
    """Our ranking metrics and NMI on `embeddings`, with seconds and peak memory."""
    with PeakRSS() as memory:
        start = time.perf_counter()
        metrics = retrieval_metrics(embeddings, labels, query_chunk_size=chunk, compute_nmi=False, use_gpu=gpu)
        ranking = time.perf_counter() - start
        metrics["nmi"] = kmeans_nmi(embeddings, labels, use_gpu=gpu)
        total = time.perf_counter() - start
    return {"seconds_ranking": round(ranking, 3), "seconds_total": round(total, 3),
            "peak_rss_mib": round(memory.peak_mib, 1),
            "peak_rss_above_start_mib": round(memory.peak_mib - memory.start_mib, 1),
            "metrics": {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}


def pml_comparison(embeddings, labels, ours: dict) -> dict:
    """PML's AccuracyCalculator on the same embeddings (itself excluded from its neighbours, as
    in ours), and the differences. PML's NMI clusters with its own faiss k-means (faiss's
    defaults: 25 iterations, seed 1234) where ours uses 20 iterations and seed 0, so NMI may
    differ a little; the ranking metrics come from the same exact search and must agree."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=tuple(PML_NAMES.values()), k="max_bin_count",
                                    device=torch.device("cpu"))
    with PeakRSS() as memory:
        start = time.perf_counter()
        pml = calculator.get_accuracy(torch.from_numpy(embeddings), torch.from_numpy(labels))
        seconds = time.perf_counter() - start
    differences = {ours_name: abs(ours["metrics"][ours_name] - float(pml[pml_name]))
                   for ours_name, pml_name in PML_NAMES.items()}
    ranking = [v for k, v in differences.items() if k != "nmi"]
    return {"version": _pml_version(), "seconds_total": round(seconds, 3),
            "peak_rss_mib": round(memory.peak_mib, 1),
            "peak_rss_above_start_mib": round(memory.peak_mib - memory.start_mib, 1),
            "metrics": {name: round(float(pml[name]), 6) for name in PML_NAMES.values()},
            "abs_difference": {k: float(f"{v:.3g}") for k, v in differences.items()},
            "max_abs_difference_ranking": float(f"{max(ranking):.3g}"),
            "nmi_abs_difference": float(f"{differences['nmi']:.3g}")}


def _pml_version() -> str:
    import pytorch_metric_learning

    return pytorch_metric_learning.__version__


def gpu_run(num: int, dim: int, classes: int, noise: float, chunk: int) -> dict:
    """Our metrics for `num` embeddings on the GPU, or why they were not measured."""
    import torch

    from pipeline.exact_search import gpu_backend

    embeddings, labels = clustered_embeddings(num, dim, classes, noise, seed=1)
    # The search's depth, as retrieval_metrics takes it: the largest Recall@K or class (R), and
    # the query itself; k-means searches 1 deep, through the same backend below 2048.
    depth = min(max(max(DEFAULT_KS), int(np.bincount(labels).max()) - 1), num - 1) + 1
    backend = gpu_backend(depth)
    if backend is None:
        return {"num": num, "dim": dim, "not_measured": "no GPU visible to faiss or torch here"}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row = {"num": num, "dim": dim, "classes": classes, "backend": backend,
           **ours_timed(embeddings, labels, chunk, gpu=True)}
    if torch.cuda.is_available():
        row["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


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
    parser.add_argument("--gpu", action="store_true",
                        help="search and cluster on the GPU (faiss-gpu, or torch's CUDA device)")
    parser.add_argument("--no-nmi", action="store_true", help="skip the k-means NMI part")
    parser.add_argument("--compare-pml", action="store_true",
                        help="also run pytorch-metric-learning's AccuracyCalculator on the same embeddings")
    parser.add_argument("--gpu-num", type=int, default=0,
                        help="also run N embeddings on the GPU when one is visible (1000000: the 1M run)")
    parser.add_argument("--gpu-classes", type=int, default=10000, help="classes of the --gpu-num run")
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
    if args.compare_pml:
        # Ours again, timed as one block with its own peak, then PML on the same arrays.
        report["ours"] = ours_timed(embeddings, labels, args.chunk, args.gpu)
        report["pml"] = pml_comparison(embeddings, labels, report["ours"])
    if args.gpu_num:
        report["gpu_run"] = gpu_run(args.gpu_num, args.dim, args.gpu_classes, args.noise, args.chunk)
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
