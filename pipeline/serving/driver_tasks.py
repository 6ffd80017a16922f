"""What the serving jobs' Ray tasks share: `jobs.evaluate` computes its metrics, and
`jobs.export_embeddings` on a cluster writes its export, in a Ray task rather than on their
driver; here are the CPUs such a task reserves, its threads, and its errors.

Not on the driver: on `cluster.yaml` that is the CPU-only head node, which would then hold
every embedding of a split and rank or index a million images on its CPUs. The task takes the
embedded split from the object store, where the embedding actors left it.
"""

from __future__ import annotations

import os


def task_cpus(setting: int, free_per_node: list[float]) -> int:
    """The CPUs a task that ranks or indexes on the CPU reserves: `setting` when set, else
    those free once the images are embedded on the node that has most free (the task runs on
    one node, so CPUs free on several add up to nothing it could start with), at least one.

    Reserved rather than merely used: faiss and torch run on every thread they are given, and
    a task that reserved one CPU but ran on all of its node's would slow a training that Ray
    had placed beside it.
    """
    if setting:
        return setting
    return max(1, int(max(free_per_node, default=1)))


def free_cpus_per_node() -> list[float]:
    """The CPUs free now on each node of the cluster this process is connected to that may
    take a task.

    Ray's public `available_resources()` sums them over the cluster; the per-node figures come
    from the GCS's cluster status (`ray.autoscaler.v2.sdk`, which `ray status` reads under the
    v2 autoscaler; the GCS keeps it under either; not a public API, hence Ray's pinned minor
    version in pyproject.toml).
    """
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    return node_free_cpus(get_cluster_status(ray.get_runtime_context().gcs_address))


def node_free_cpus(status) -> list[float]:
    """Free CPUs of each node in a `ClusterStatus` that may take a task: running or idle, not
    draining (Ray places nothing new there: the autoscaler is ending the node, most often an
    idle one, whose CPUs are all free), not pending or dead."""
    free = []
    for node in status.active_nodes + status.idle_nodes:
        if node.node_status == "DRAINING" or node.resource_usage is None:
            continue
        free += [u.total - u.used for u in node.resource_usage.usage if u.resource_name == "CPU"]
    return free


def cluster_task_cpus(setting: int) -> int:
    """`task_cpus` for the cluster this process is connected to, as it is now."""
    return setting or task_cpus(setting, free_cpus_per_node())


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
