"""Images/s of the planned input pipeline alone and of full training, on this machine.

    python benchmarks/input_pipeline.py --preset local --sub-batches 120 --set train.epochs=1

Prints one JSON line: the Ray Data stream (plan -> fetch -> decode -> augment) consumed
with no model, and training images/s as rank 0 logged it to MLflow (the first interval,
which includes start-up, is left out). Training faster than the input pipeline alone, or a
high `data_wait_fraction`, means the model is starved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def measure_input_pipeline(config, root: str, sub_batches: int) -> dict:
    """Consume `sub_batches` decoded sub-batches from the Ray Data stream as one rank reads it
    (Ray Train's ingest with the driver's data config: in plan order), with no model."""
    from pipeline.data.ray_datasets import build_training_data
    from pipeline.training.driver import trainer_data_config

    data = build_training_data(config, root)
    [shard] = trainer_data_config(data).configure(
        {"train": data.train}, world_size=1, worker_handles=None, worker_node_ids=None
    )
    iterator = iter(shard["train"].iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=4))
    next(iterator)  # start-up (actor creation, first decode) is not throughput
    start = time.perf_counter()
    images = 0
    for _ in range(sub_batches):
        batch = next(iterator, None)
        if batch is None:
            break
        images += batch["images"].shape[1]
    seconds = time.perf_counter() - start
    # Stop the prefetch thread before Ray shuts down: left running, it touched the shut-down
    # core worker, which ended the process with status 1 (in 8 of 16 runs).
    iterator.close()
    return {"input_images_per_s": images / seconds, "input_images": images, "input_seconds": seconds}


def measure_training(config) -> dict:
    """Run a short training and read rank 0's images/s from MLflow."""
    from mlflow import MlflowClient

    from pipeline.training.driver import run_training

    summary = run_training(config, printer=lambda *a, **k: None)
    history = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "train/images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    waits = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "train/data_wait_fraction")
    return {
        "train_images_per_s": statistics.median(rates) if rates else float("nan"),
        "train_data_wait_fraction": statistics.median(m.value for m in waits[1:]) if len(waits) > 1 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--sub-batches", type=int, default=120)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.evaluation.protocol import resolve_evaluation
    from pipeline.training.driver import resolve_dataset

    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(args.preset, [f"train.storage_path={scratch}", "train.max_failures=0", *args.overrides])
        root, metadata = resolve_dataset(config)
        config = resolve_evaluation(config, metadata)  # the test split the data graph reads
        ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        result = {
            "machine": f"{platform.node()} {os.cpu_count()} CPUs",
            "preset": args.preset,
            "overrides": args.overrides,
            "sub_batch": config.sub_batch_size,
            "decode_actors": config.data.decode_actors,
        }
        result.update(measure_input_pipeline(config, root, args.sub_batches))
        if not args.skip_training:
            result.update(measure_training(config))
        print(json.dumps(result), flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
