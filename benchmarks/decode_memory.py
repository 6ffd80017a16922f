"""Memory of one decode-actor call: the resident set while `TrainBatchDecoder` decodes a block
of the shared training stream (`SHARED_STREAM_BLOCK` sub-batches in one call, what the fused
read + decode does) against one sub-batch per call.

    python benchmarks/decode_memory.py                       # the gpu preset's sub-batch: 32 x 4 at 224 px
    python benchmarks/decode_memory.py --classes-per-batch 8 --samples-per-class 4 --image-size 48

Photo-like 341x256 JPEGs (what the converters store by default) are put in this process's Ray
object store; the decoder runs in this process (as in an actor), and a thread samples its
resident set every millisecond. Prints one JSON line per call size: the output's bytes and the
peak rise of the resident set over the level before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import numpy as np
import pyarrow as pa

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def peak_rise(call) -> tuple[int, object]:
    """(peak resident bytes above the level before `call()`, its result), sampled every ms."""
    before = resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident_bytes()) - before, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes-per-batch", type=int, default=32, help="P (gpu preset: 32)")
    parser.add_argument("--samples-per-class", type=int, default=4, help="M (gpu preset: 4)")
    parser.add_argument("--image-size", type=int, default=224, help="training crop (gpu preset: 224)")
    parser.add_argument("--classes", type=int, default=64, help="classes of the generated split")
    parser.add_argument("--images-per-class", type=int, default=8, help="distinct JPEGs per class")
    parser.add_argument("--repeats", type=int, default=3, help="calls of each size")
    args = parser.parse_args()

    import ray
    import torch
    from throughput import textured_jpeg

    from pipeline.data.decoding import EncodedImageStore, TrainBatchDecoder
    from pipeline.data.planning import MPerClassPlanner
    from pipeline.data.ray_datasets import SHARED_STREAM_BLOCK

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        count = args.classes * args.images_per_class
        labels = np.repeat(np.arange(args.classes), args.images_per_class)
        table = pa.table({"image": [textured_jpeg(341, 256, seed) for seed in range(count)]})
        store = EncodedImageStore([ray.put(table)], np.zeros(count, np.int32), np.arange(count), labels,
                                  np.arange(args.classes))
        planner = MPerClassPlanner(labels, args.classes_per_batch, args.samples_per_class)
        decoder = TrainBatchDecoder(planner, store, args.image_size, 0.16, seed=0)
        decoder({"id": np.arange(1)})  # first call: transforms and decoder set up
        for sub_batches in (1, SHARED_STREAM_BLOCK) * args.repeats:
            start = time.perf_counter()
            rise, out = peak_rise(lambda n=sub_batches: decoder({"id": np.arange(n)}))
            seconds = time.perf_counter() - start
            output_bytes = sum(v.nbytes for v in out.values())
            print(json.dumps({
                "sub_batches_per_call": sub_batches,
                "images_per_sub_batch": planner.batch_size,
                "image_size": args.image_size,
                "output_bytes": output_bytes,
                "output_mb": round(output_bytes / 2**20, 1),
                "peak_rise_mb": round(rise / 2**20, 1),
                "seconds": round(seconds, 2),
                "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                "torch": torch.__version__,
            }), flush=True)
            del out
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
