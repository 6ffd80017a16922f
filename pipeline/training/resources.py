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


def gpu_requests(config: Config) -> list[float]:
    """The GPU requests of one run, in the order Ray places them: the refresh actor's (started
    before the trainer), then one per Train worker."""
    refresh = [config.refresh.num_gpus] if config.uses_refresh_actor and config.refresh.num_gpus > 0 else []
    return refresh + ([config.train.gpus_per_worker] * config.train.num_workers if config.train.use_gpu else [])


GPU_PACKING = ("Ray never splits a share across GPUs, and the refresh actor shares a worker's GPU "
               "only when refresh.num_gpus <= 1 - train.gpus_per_worker")
"""Why GPU shares that sum to few enough GPUs may not fit, for messages."""


def gpu_requests_fit(requests: list[float], gpus: int) -> bool:
    """Whether Ray can place `requests`, in order, on `gpus` GPUs. Ray never splits a fraction
    across GPUs: it must fit in what one GPU has left; a whole number takes that many unused
    GPUs. Each share goes to the first GPU with room (Ray may choose another, but for a run's
    shares, equal worker shares above half a GPU and one actor share, the answer is the same);
    so 2 workers of 0.75 and a refresh actor of 0.5 need 3 GPUs, though their shares sum to 2."""
    free = [1.0] * int(gpus)
    for request in requests:
        if request >= 1:
            unused = [i for i, left in enumerate(free) if left >= 1 - 1e-9]
            if len(unused) < request:
                return False
            for i in unused[: int(request)]:
                free[i] = 0.0
            continue
        for i, left in enumerate(free):
            if left + 1e-9 >= request:
                free[i] = left - request
                break
        else:
            return False
    return True


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
    if not gpu_requests_fit(gpu_requests(config), int(have["GPU"])):
        refresh_asks = config.uses_refresh_actor and config.refresh.num_gpus > 0
        if not config.train.use_gpu:
            raise ValueError(f"refresh.num_gpus: the refresh actor asks for {config.refresh.num_gpus:g} GPUs "
                             f"but this machine has {have['GPU']:g}; set refresh.num_gpus=0, or set "
                             "RAY_ADDRESS to run on a cluster")
        shares = (f"train.num_workers={config.train.num_workers} x train.gpus_per_worker="
                  f"{config.train.gpus_per_worker:g}"
                  + (f", refresh.num_gpus={config.refresh.num_gpus:g}" if refresh_asks else ""))
        if need["GPU"] > have["GPU"] + 1e-9:
            problem = f"the run needs {need['GPU']:g} GPUs ({shares}) but this machine has {have['GPU']:g}"
        else:
            problem = f"the run's GPU shares ({shares}) do not fit on this machine's {have['GPU']:g} GPUs: {GPU_PACKING}"
        raise ValueError(f"train.use_gpu: {problem}; set train.use_gpu=false or fewer workers, or set "
                         "RAY_ADDRESS to run on a cluster")
    if need["CPU"] > have["CPU"] + 1e-9:
        raise ValueError(
            f"train.num_workers: the run needs {need['CPU']:g} logical CPUs (workers, decode "
            f"actors{', refresh actor' if config.uses_refresh_actor else ''}, a read task) but a "
            f"local Ray has {have['CPU']:g}; lower train.num_workers, train.cpus_per_worker or "
            f"data.decode_actors, or set RAY_ADDRESS to run on a cluster"
        )
