"""What the serving jobs' Ray tasks share: `jobs.evaluate` computes its metrics, and
`jobs.export_embeddings` on a cluster writes its export, in a Ray task rather than on their
driver; here are the CPUs such a task reserves, its threads, and its errors.

Not on the driver: on `cluster.yaml` that is the CPU-only head node, which would then hold
every embedding of a split and rank or index a million images on its CPUs. The task takes the
embedded split from the object store, where the embedding actors left it.
"""

from __future__ import annotations

import os


def task_cpus(setting: int, free: float, node_cpus: list[float]) -> int:
    """The CPUs a task that ranks or indexes on the CPU reserves: `setting` when set, else
    those `free` in the cluster once the images are embedded, at most the largest node's
    (`node_cpus`: the task runs on one node), and at least one.

    Reserved rather than merely used: faiss and torch run on every thread they are given, and
    a task that reserved one CPU but ran on all of its node's would slow a training that Ray
    had placed beside it.
    """
    if setting:
        return setting
    return max(1, int(min(free, max(node_cpus, default=1))))


def cluster_task_cpus(setting: int) -> int:
    """`task_cpus` for the cluster this process is connected to, as it is now."""
    import ray

    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return task_cpus(setting, ray.available_resources().get("CPU", 0), nodes)


def use_reserved_cpus() -> int:
    """Give faiss and torch, in this Ray task, as many threads as the CPUs the task reserved
    (no more than the cores this process may run on); return that number. Ray sets
    OMP_NUM_THREADS when a worker starts, but a worker is reused by tasks of other sizes."""
    import faiss
    import ray
    import torch

    reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads = max(1, min(int(reserved), len(os.sched_getaffinity(0))))
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    return threads


def task_result(ref):
    """`ray.get(ref)`, with a ValueError the task raised (bad input: too few images, NaN
    embeddings) re-raised as itself, so the job prints its message rather than a Ray traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ValueError):
            raise err.cause from None
        raise
