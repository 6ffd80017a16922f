"""What one training run holds on Ray, and what a local Ray instance (no `RAY_ADDRESS`) has:
so a run or sweep that cannot fit on this machine is refused before Ray starts, rather than
left waiting for workers that Ray can never place (Ray Train retries that wait forever)."""

from __future__ import annotations

import os

from pipeline.config import Config

LOCAL_MIN_CPUS = 4
"""A local Ray gets at least this many logical CPUs, more than a small machine's cores, so Ray
Data's read and decode tasks and the Train workers never starve each other."""


def run_resources(config: Config) -> dict[str, float]:
    """Logical CPUs and GPUs one run holds while it trains: the Train workers, the decode actors
    (per rank for Magnet/PDDM, whose ranks each have their own stream), a Ray Data read or
    eval-decode task, and, for Magnet/PDDM, the refresh actor. The driver takes none."""
    from pipeline.data.ray_datasets import EVAL_DECODE_CPUS, READ_CPUS

    cpus = config.train.num_workers * config.train.cpus_per_worker
    streams = config.train.num_workers if config.uses_refresh_actor else 1
    cpus += streams * config.data.decode_actors * config.data.decode_cpus
    cpus += max(READ_CPUS, EVAL_DECODE_CPUS)
    gpus = config.train.num_workers * config.train.gpus_per_worker if config.train.use_gpu else 0.0
    if config.uses_refresh_actor:
        cpus += config.refresh.num_cpus
        gpus += config.refresh.num_gpus
    return {"CPU": cpus, "GPU": gpus}


def uses_local_ray() -> bool:
    """True when Ray will start on this machine (no `RAY_ADDRESS` names a cluster to join). A
    notebook that joins a cluster itself (`ray.init(address=...)`) sets RAY_ADDRESS instead, or
    its runs are checked against this machine."""
    return not os.environ.get("RAY_ADDRESS")


def local_resources() -> dict[str, float]:
    """The logical CPUs and the GPUs a local Ray instance gets (`_init_ray` asks for these CPUs;
    Ray, like torch, sees the GPUs CUDA_VISIBLE_DEVICES leaves)."""
    import torch

    return {"CPU": float(max(LOCAL_MIN_CPUS, os.cpu_count() or 1)), "GPU": float(torch.cuda.device_count())}


def check_fits_locally(config: Config, have: dict[str, float]) -> None:
    """Raise ValueError naming the settings when one run needs more than `have`."""
    need = run_resources(config)
    if need["GPU"] > have["GPU"] + 1e-9:
        raise ValueError(
            f"train.use_gpu: the run needs {need['GPU']:g} GPUs (train.num_workers="
            f"{config.train.num_workers} x train.gpus_per_worker={config.train.gpus_per_worker:g}"
            + (f", refresh.num_gpus={config.refresh.num_gpus:g}" if config.uses_refresh_actor else "")
            + f") but this machine has {have['GPU']:g}; set train.use_gpu=false or fewer "
            f"workers, or set RAY_ADDRESS to run on a cluster"
        )
    if need["CPU"] > have["CPU"] + 1e-9:
        raise ValueError(
            f"train.num_workers: the run needs {need['CPU']:g} logical CPUs (workers, decode "
            f"actors{', refresh actor' if config.uses_refresh_actor else ''}, a read task) but a "
            f"local Ray has {have['CPU']:g}; lower train.num_workers, train.cpus_per_worker or "
            f"data.decode_actors, or set RAY_ADDRESS to run on a cluster"
        )
