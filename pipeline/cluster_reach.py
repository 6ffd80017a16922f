"""What a run's processes on other nodes open, checked from those nodes before the run starts.

The preflight checks paths and servers from the driver's machine. On a cluster of several
machines the Train workers, the decode actors and the refresh actor run on the others, where a
local path is that machine's own disk (the driver's files only on a shared filesystem) and
127.0.0.1 is that machine's own loopback. Nothing would say so in time: Ray Train finds an
unshared `train.storage_path` at the first checkpoint, after an epoch; a dataset path fails the
first read; rank 0 and the refresh actor open an empty MLflow store of their own, or queue
metrics for a server they never reach, and the run ends without them.

So, on a cluster, the driver has every live node look for the run's local files (its
lock file under `train.storage_path`, the dataset's `metadata.json`, the pretrained weights, a
local MLflow store) and connect to its servers (the tracking server, the S3 endpoint), and
refuses the run, naming the node and the setting, before its MLflow run is created. Nodes an
autoscaler starts later are not checked: the docs' cluster page says what they must share.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 60.0
"""How long the driver waits for the other nodes' answers (a node that must first set up the
job's runtime environment answers late); a node that has not answered is named in a warning."""

CONNECT_TIMEOUT_S = 5.0
"""How long a node waits for a server to accept a connection."""


@dataclass(frozen=True)
class Need:
    """One thing the run's processes on every node open: a local `file` or a `server`."""

    setting: str  # the setting that names it, for the message
    shown: str  # its value as the user gave it
    kind: str  # "file" (target: an absolute path) or "server" (target: "host:port")
    target: str


def local_path(location: str) -> str | None:
    """The absolute local path of a path or file:// URI; None for other URIs (s3://, ...)."""
    if "://" not in location:
        return os.path.abspath(location)
    parts = urlsplit(location)
    return os.path.abspath(parts.path) if parts.scheme == "file" else None


def _server(url: str) -> str | None:
    """host:port of an http(s) URL; None for others."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def tracking_need(uri: str, setting: str) -> Need | None:
    """What opening the MLflow store at `uri` needs on a node: its server, or its local files."""
    if uri.startswith("sqlite:///"):
        return Need(setting, uri, "file", os.path.abspath(uri[len("sqlite:///"):]))
    server = _server(uri)
    if server is not None:
        return Need(setting, uri, "server", server)
    if uri.startswith("databricks"):  # MLflow's names for Databricks' hosted stores
        return None
    path = local_path(uri)  # a file store (a folder of runs)
    return None if path is None else Need(setting, uri, "file", path)


def run_needs(config, root: str, lock_file: str | None) -> list[Need]:
    """What a run of `config` on dataset `root` opens on every node. `lock_file`: the run's (or
    sweep's) lock file when its storage is local: the driver has just written it there, so a
    node that does not see it does not share the storage."""
    from pipeline import storage, tracking

    needs = []
    if lock_file is not None:
        needs.append(Need("train.storage_path", config.train.storage_path, "file", os.path.abspath(lock_file)))
    root_path = local_path(root)
    if root_path is not None:
        setting = "data.root" if config.data.root else "data.cache_dir"
        shown = config.data.root or config.data.cache_dir
        needs.append(Need(setting, shown, "file", os.path.join(root_path, "metadata.json")))
    pretrained = config.model.pretrained and local_path(config.model.pretrained)
    if pretrained:
        needs.append(Need("model.pretrained", config.model.pretrained, "file", pretrained))
    store = tracking_need(tracking.tracking_uri(config), tracking.tracking_setting(config))
    if store is not None:
        needs.append(store)
    locations = (config.train.storage_path, root, config.model.pretrained)
    endpoint = storage.s3_endpoint_url()
    if endpoint and any(str(location).startswith("s3://") for location in locations):
        server = _server(endpoint)
        if server is not None:
            needs.append(Need("storage.s3_endpoint_url", endpoint, "server", server))
    return needs


def unmet(needs: list[Need]) -> list[str]:
    """On the node it runs on: what of `needs` is not there, one line each."""
    problems = []
    for need in needs:
        if need.kind == "file":
            if not os.path.exists(need.target):
                problems.append(f"{need.setting}: {need.target} is not on this node's disk")
            continue
        host, port = need.target.rsplit(":", 1)
        if _through_proxy(need.shown, host):  # MLflow and boto go through it: a direct
            continue  # connection says nothing
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            problems.append(f"{need.setting}: {need.shown} does not answer from this node "
                            f"({err.strerror or err})")
    return problems


def _through_proxy(url: str, host: str) -> bool:
    """Whether this node reaches `url` through an HTTP(S) proxy (its environment's)."""
    scheme = urlsplit(url).scheme
    proxies = urllib.request.getproxies()
    return scheme in proxies and not urllib.request.proxy_bypass(host)


def check_cluster_reach(needs: list[Need], printer=print, timeout_s: float = PROBE_TIMEOUT_S,
                        whose: str = "the run's processes") -> None:
    """On a cluster (RAY_ADDRESS; Ray connected), have every live node that has CPUs (where the
    run's processes can go) check `needs` (`unmet`); raise ValueError naming each node and what
    it lacks. Nothing to do on a local Ray, or when the only such node is the driver's own (the
    preflight checked it). The driver's node is asked too when there are others: which of a
    machine's nodes a driver attaches to is Ray's choice, and a node there answers at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.training.resources import uses_local_ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    if uses_local_ray() or not needs or not nodes or [node["NodeID"] for node in nodes] == [here]:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(unmet)
    asked = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(needs): node
        for node in nodes
    }
    answered, late = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
    problems = []
    for ref in answered:
        node = _node_name(asked[ref])
        try:
            problems += [f"node {node}: {problem}" for problem in ray.get(ref)]
        except Exception as err:  # noqa: BLE001 - a node that cannot run the check is not a refusal
            printer(f"warning: node {node} could not check what the run opens there: {err}", flush=True)
    for ref in late:
        printer(f"warning: node {_node_name(asked[ref])} did not check what the run opens there in "
                f"{timeout_s:g} s; going on", flush=True)
        ray.cancel(ref, force=True)
    if problems:
        raise ValueError(
            f"{whose} on other nodes of the cluster would not find what they open:\n  "
            + "\n  ".join(problems)
            + "\nput local paths on a filesystem every node mounts at the same path, or use s3://, "
            "and name servers by an address every node reaches (not 127.0.0.1 or localhost); "
            "see docs/cluster.md"
        )


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
