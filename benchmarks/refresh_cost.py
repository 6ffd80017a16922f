"""What a Magnet refresh costs: the embedding pass and the clustering, against dataset size,
and (with --training) the training time lost to refreshes in a real run.

    python benchmarks/refresh_cost.py                      # clustering + embedding sweeps
    python benchmarks/refresh_cost.py --training           # also two short Magnet runs
    python benchmarks/refresh_cost.py --sizes 100000,1000000 --pool-sizes 100000,1000000 \
        --dims 128,512 --embed "resnet50:224:2048"            # at scale (GPU faiss when present)

Clustering runs `build_cluster_index` (faiss k-means per class + impostor search) on random
embeddings with 60 images per class, K=8, M=12; the pools sweep runs `build_hard_pools` (PDDM's
full-set kNN, pool 32) on the same kind of embeddings (or, with --clustered, class-clustered
ones), exact or with the approximate faiss indexes of --pool-indexes, whose pools are scored
(recall) against exact pools of 200 sampled classes computed by brute force. The embedding pass runs the model over uint8
images already decoded (the actor keeps them decoded after its first pass, when they fit in
`refresh.cache_max_mb`); --decode measures that first pass, with each thread count, and
--cached-pass a later one whose cache holds part of the split. --training trains
the `magnet` preset twice - refreshing every `--every` steps, and refreshing never (only the
initial index) - and compares the time per training step. On CUDA the exact searches (pools,
impostors) run on faiss-gpu, or on torch's device where faiss has no GPU, and k-means on
faiss-gpu where present; on a CPU the exact pools search is not run above --max-exact-pools (it
grows as N^2), and the line says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
import uuid

import faiss
import numpy as np
import torch

STEP_LINE = re.compile(r"epoch\s+\d+ step\s+(\d+)/")
"""The driver's line for a logging interval (pipeline.progress.format_event), with its step."""


def random_embeddings(n, dim, clustered=False, long_tail=False):
    """n unit vectors in 60-image classes (the size of a CUB class), seeded. Uniform on the
    sphere by default (no structure: the hardest case for an approximate kNN index); with
    `clustered`, each class is a spread of vectors around its own center, as trained embeddings
    are. With `long_tail`, class sizes follow a Pareto law (shape 1.2, at least 2, at most 1,000
    images), as in iNaturalist: most classes small, a few large."""
    rng = np.random.default_rng(0)
    if long_tail:
        sizes = np.minimum(2 + (rng.pareto(1.2, n) * 4).astype(np.int64), 1000)
        labels = np.repeat(np.arange(n), sizes)[:n]
    else:
        labels = np.arange(n) // 60
    embeddings = rng.standard_normal((n, dim)).astype(np.float32)
    if clustered:
        centers = rng.standard_normal((int(labels.max()) + 1, dim)).astype(np.float32)
        embeddings = centers[labels] + 0.7 * embeddings
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, labels


def clustering_sweep(sizes, dim, use_gpu):
    from pipeline.refresh.cluster_index import build_cluster_index

    rows = []
    for n in sizes:
        embeddings, labels = random_embeddings(n, dim)
        start = time.perf_counter()
        index, cluster_seconds = build_cluster_index(
            embeddings, labels, clusters_per_class=8, num_impostors=11, version=1, model_step=0, use_gpu=use_gpu
        )
        rows.append({"n": n, "dim": dim, "classes": int(labels.max()) + 1, "clusters": index.num_clusters,
                     "cluster_seconds": round(cluster_seconds, 3),
                     "wall_seconds": round(time.perf_counter() - start, 3)})
        print(json.dumps({"clustering": rows[-1]}), flush=True)
    return rows


def sampled_exact_pools(embeddings, labels, classes, pool_size):
    """{class: its exact pool} for the given classes, by brute force over every example
    (independent of faiss): other-class examples ranked by their distance to the nearest member."""
    x = torch.from_numpy(embeddings)
    norms = (x * x).sum(1)
    pools = {}
    for c in classes:
        members = np.flatnonzero(labels == c)
        m = x[members]
        to_class = (norms[:, None] + norms[members][None] - 2 * x @ m.T).min(1).values.numpy()
        to_class[labels == c] = np.inf
        nearest = np.argpartition(to_class, pool_size)[:pool_size]
        pools[int(c)] = nearest[np.argsort(to_class[nearest], kind="stable")]
    return pools


def pool_recall(index, reference):
    """Mean over the reference's classes of the share of its exact pool the index's pool has."""
    position = {int(c): p for p, c in enumerate(index.classes)}
    shares = [len(np.intersect1d(index.pool(position[c]), exact)) / len(exact) for c, exact in reference.items()]
    return float(np.mean(shares))


def pools_sweep(sizes, dim, pool_size, use_gpu, max_exact, searches=(("Flat", ""),), clustered=False,
                recall_classes=200, long_tail=False):
    """`build_hard_pools` at each size with each (index description, search parameters); an
    approximate index's pools are scored against exact pools of `recall_classes` sampled classes."""
    from pipeline.refresh.hard_pools import EXACT_INDEX, build_hard_pools

    rows = []
    for n in sizes:
        embeddings, labels = random_embeddings(n, dim, clustered, long_tail)
        reference = None
        for description, params in searches:
            data = ("clustered" if clustered else "uniform") + (", long-tailed classes" if long_tail else "")
            row = {"n": n, "dim": dim, "data": data, "index": description, "search_params": params,
                   "largest_class": int(np.bincount(labels).max())}
            if description == EXACT_INDEX and n > max_exact:
                # Exact kNN of every example among all is N^2 D: not run, and no figure made up.
                rows.append({**row, "skipped": f"exact N^2 search above --max-exact-pools {max_exact}"})
                print(json.dumps({"hard_pools": rows[-1]}), flush=True)
                continue
            index, knn_seconds = build_hard_pools(
                embeddings, labels, pool_size, version=1, model_step=0, use_gpu=use_gpu,
                index_description=description, search_params=params,
            )
            row.update({"classes": int(labels.max()) + 1, "pool_size": pool_size, "knn_seconds": round(knn_seconds, 3)})
            if description != EXACT_INDEX:
                if reference is None:
                    num_classes = int(labels.max()) + 1
                    sample = np.random.default_rng(1).choice(num_classes, min(recall_classes, num_classes), replace=False)
                    reference = sampled_exact_pools(embeddings, labels, sample, pool_size)
                row.update({"recall": round(pool_recall(index, reference), 4), "recall_classes": len(reference)})
            rows.append(row)
            print(json.dumps({"hard_pools": rows[-1]}), flush=True)
    return rows


def embedding_sweep(backbone, image_size, sizes, batch_size, device):
    """Full-set re-embedding as the refresh actor does it (`RefreshActor._embed_all` over
    decoded uint8 batches: copy to the device, to float, model, back to the host) against bare
    inference (the same model on a float batch already on the device, nothing copied back)."""
    from types import SimpleNamespace

    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.refresh.actor import RefreshActor

    config = load_config("local", [f"model.backbone={backbone}"])
    model = build_model(config.model).to(device).eval()
    autocast = device.type == "cuda"
    rows = []
    for n in sizes:
        images = torch.randint(0, 255, (batch_size, 3, image_size, image_size), dtype=torch.uint8).numpy()
        batches = [images[: min(batch_size, n - start)] for start in range(0, n, batch_size)]
        on_device = torch.from_numpy(images).to(device).float().div_(255)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model(on_device)  # warm-up at the full batch size
            _sync(device)
            start = time.perf_counter()
            for batch in batches:
                model(on_device[: len(batch)])
            _sync(device)
        bare_seconds = time.perf_counter() - start
        # The actor's own method, fed the batches its image cache would yield.
        actor = SimpleNamespace(_image_batches=lambda batches=batches: iter(batches))
        start = time.perf_counter()
        embeddings = RefreshActor._embed_all(actor, model, device)
        seconds = time.perf_counter() - start
        assert embeddings.shape == (n, config.model.embedding_dim)
        rows.append({"backbone": backbone, "image_size": image_size, "n": n, "batch_size": batch_size,
                     "embed_seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
                     "bare_inference_images_per_s": round(n / bare_seconds, 1),
                     "fraction_of_bare": round(bare_seconds / seconds, 3)})
        print(json.dumps({"embedding": rows[-1]}), flush=True)
    return rows


def decode_sweep(count, threads_list, batch_size, image_size=224, resize=256):
    """The refresh actor's first pass before its embedding: decode + eval resize and crop of
    every training image (`decoded_batches`, what `RefreshActor._decode_from` runs), images/s
    with each thread count. Photo-like JPEGs of 341x256, what the converters store by default
    (256 px short side); 100 distinct images, cycled."""
    from pipeline.data.decoding import decoded_batches

    decode = _photo_decoder(count, image_size, resize)
    for threads in threads_list:
        start = time.perf_counter()
        decoded = sum(len(batch) for batch in decoded_batches(decode, count, batch_size, threads))
        seconds = time.perf_counter() - start
        print(json.dumps({"first_pass_decode": {
            "n": decoded, "threads": threads, "stored": "341x256 JPEG", "eval": f"{resize} -> {image_size}",
            "seconds": round(seconds, 3), "images_per_s": round(decoded / seconds, 1),
        }}), flush=True)


def cached_pass_sweep(count, fractions, batch_size, image_size=224, resize=256):
    """A later refresh's images when `refresh.cache_max_mb` holds a fraction of the decoded
    split (`PrefixCache`, what the actor keeps): the first pass decodes everything and keeps
    what fits, the second replays that and decodes the rest, in one thread (the default
    `refresh.num_cpus`). The same photo-like JPEGs as `decode_sweep`."""
    from pipeline.data.decoding import PrefixCache, decoded_batches

    decode = _photo_decoder(count, image_size, resize)

    def stream(start_batch):
        return decoded_batches(decode, count, batch_size, 1, start=start_batch * batch_size)

    split_bytes = count * 3 * image_size**2
    for fraction in fractions:
        cache = PrefixCache(int(fraction * split_bytes))
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            passed = sum(len(batch) for batch in cache.batches(stream))
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"cached_pass": {
            "n": passed, "cache_fraction_of_split": fraction, "kept_images": sum(len(b) for b in cache.kept),
            "split_mib": round(split_bytes / 2**20, 1), "first_pass_seconds": round(seconds[0], 3),
            "second_pass_seconds": round(seconds[1], 3), "second_pass_images_per_s": round(passed / seconds[1], 1),
        }}), flush=True)
        del cache


def _photo_decoder(count, image_size, resize):
    """`decode(i)`: image i (of `count`) decoded with the eval resize and crop, as the refresh
    actor decodes it; 100 distinct photo-like 341x256 JPEGs, cycled."""
    from throughput import textured_jpeg

    from pipeline.data.decoding import decode_rgb, eval_transform

    images = [textured_jpeg(341, 256, seed) for seed in range(min(count, 100))]
    transform = eval_transform(image_size, resize)

    def decode(i):
        return transform(decode_rgb(images[i % len(images)])).numpy()

    return decode


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_overhead(every, epochs, storage, device):
    """Seconds per training step of Magnet with the refresh at period `every` (0: once per
    epoch) against the same run refreshing never after its initial index. On CUDA the run is
    throughput.py's one-GPU Magnet, whose refresh actor shares the worker's GPU."""
    from throughput import shutdown_ray

    from pipeline.config import load_config
    from pipeline.training.driver import run_training

    # A new folder per call: under a reused one the runs would resume from an earlier call's
    # checkpoints (same run names) and time nothing but the steps that call left undone.
    if "://" in storage:  # a bucket: a unique prefix (mkdtemp would make a local 's3:' folder)
        storage = f"{storage.rstrip('/')}/refresh-bench-{uuid.uuid4().hex[:12]}"
    else:
        os.makedirs(storage, exist_ok=True)
        storage = tempfile.mkdtemp(prefix="refresh-bench-", dir=storage)
    results = {}
    for label, period in (("refreshing", every), ("initial_index_only", 10**9)):
        overrides = [
            f"refresh.every_steps={period}", f"train.epochs={epochs}", "eval.every_epochs=1000",
            "data.seen_holdout_fraction=0.0", f"train.storage_path={storage}/{label}",
            f"train.run_name=refresh-bench-{label}",
        ]
        if device.type == "cuda":
            from throughput import loss_config

            config = loss_config("gpu", "magnet", overrides, storage)
        else:
            config = load_config("magnet", overrides)
        times: list[tuple[int, float]] = []

        def printer(text, times=times, **_):
            logged = STEP_LINE.match(text)  # a logging interval's line, not other text naming a step
            if logged:
                times.append((int(logged.group(1)), time.perf_counter()))

        run_training(config, printer=printer)
        (s0, t0), (s1, t1) = times[1], times[-1]  # from the first logged interval on: no start-up
        results[label] = {"steps": s1 - s0, "seconds": round(t1 - t0, 2),
                          "seconds_per_step": round((t1 - t0) / (s1 - s0), 4)}
        print(json.dumps({"training": {label: results[label]}}), flush=True)
        shutdown_ray()  # the next run starts its own cluster once this one's processes are gone
    lost = results["refreshing"]["seconds_per_step"] / results["initial_index_only"]["seconds_per_step"] - 1
    results["time_lost_fraction"] = round(lost, 4)
    print(json.dumps({"training_time_lost_fraction": results["time_lost_fraction"]}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,200000", help="training-set sizes to cluster")
    parser.add_argument("--pool-sizes", default="10000,50000", help="training-set sizes for PDDM's pools")
    parser.add_argument("--dims", "--dim", default="128", help="embedding dimensions, comma-separated")
    parser.add_argument("--pool-indexes", default="Flat",
                        help="';'-separated faiss indexes for the pools, each DESCRIPTION[:SEARCH_PARAMS], e.g. "
                             "'Flat;IVF4096,Flat:nprobe=32;HNSW32:efSearch=64'")
    parser.add_argument("--clustered", action="store_true",
                        help="pools of class-clustered embeddings instead of uniform ones")
    parser.add_argument("--long-tail", action="store_true",
                        help="pools over long-tailed class sizes (2 to 1,000 images) instead of 60 per class")
    parser.add_argument("--max-exact-pools", type=int, default=None,
                        help="largest N for the exact pools search (default: 200k on CPU, no limit on GPU)")
    parser.add_argument("--embed", default="tiny_cnn:48:2000,8000;resnet18:224:512",
                        help="backbone:image_size:n1,n2 groups, ';'-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--decode", default="2000:1,2",
                        help="N:THREADS,... - the actor's first-pass decode of N images with each thread count "
                             "(refresh.num_cpus sets the actor's); empty to skip")
    parser.add_argument("--cached-pass", default="",
                        help="COUNT:FRACTIONS, e.g. 2000:0,0.5,1: a later refresh's decode with the "
                        "cache holding each fraction of the decoded split (one thread)")
    parser.add_argument("--training", action="store_true", help="also measure training time lost")
    parser.add_argument("--every", type=int, default=27, help="refresh period of the --training run")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--storage", default="/tmp/refresh-bench")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from pipeline.exact_search import faiss_gpu_count, gpu_backend

    use_gpu = device.type == "cuda"
    print(json.dumps({"machine": platform.node(), "device": torch.cuda.get_device_name() if device.type == "cuda"
                      else f"cpu x{torch.get_num_threads()} threads", "faiss_gpus": faiss_gpu_count(),
                      "exact_search_gpu_backend": gpu_backend(32 + 60),  # pool 32 + a 60-image class
                      "faiss_threads": faiss.omp_get_max_threads()}), flush=True)
    max_exact = args.max_exact_pools or (10**12 if use_gpu else 200_000)
    for dim in (int(d) for d in args.dims.split(",")):
        if args.sizes:
            clustering_sweep([int(s) for s in args.sizes.split(",")], dim, use_gpu)
        if args.pool_sizes:
            searches = [tuple((entry.split(":", 1) + [""])[:2]) for entry in args.pool_indexes.split(";") if entry]
            pools_sweep([int(s) for s in args.pool_sizes.split(",")], dim, 32, use_gpu, max_exact, searches,
                        args.clustered, long_tail=args.long_tail)
    for group in filter(None, args.embed.split(";")):
        backbone, size, ns = group.split(":")
        embedding_sweep(backbone, int(size), [int(n) for n in ns.split(",")], args.batch_size, device)
    if args.decode:
        count, threads = args.decode.split(":")
        decode_sweep(int(count), [int(t) for t in threads.split(",")], args.batch_size)
    if args.cached_pass:
        count, fractions = args.cached_pass.split(":")
        cached_pass_sweep(int(count), [float(f) for f in fractions.split(",")], args.batch_size)
    if args.training:
        training_overhead(args.every, args.epochs, args.storage, device)


if __name__ == "__main__":
    main()
