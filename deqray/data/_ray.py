"""Connecting to Ray (the running cluster when there is one, a local one otherwise), and what
the cluster joined tells the readers."""

from __future__ import annotations

import os


def connect(num_cpus: int | None = None, resources: dict | None = None, **kwargs):
    """ray.init() that joins a cluster (RAY_ADDRESS or a running local head) or starts one.

    Inside a job submitted to a cluster, `num_cpus` and `resources` must not be
    passed (Ray refuses them), so they are only used when a new local
    instance is started.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs.setdefault("log_to_driver", True)
    address = os.environ.get("RAY_ADDRESS")
    if address == "local":  # a new local instance, even where another one runs
        return ray.init(address="local", num_cpus=num_cpus, resources=resources, **kwargs)
    if address:
        return ray.init(address=address, **kwargs)
    try:
        return ray.init(address="auto", **kwargs)
    except (ConnectionError, RuntimeError):
        return ray.init(num_cpus=num_cpus, resources=resources, **kwargs)


def read_concurrency() -> int | None:
    """Read tasks in flight at once for reads that ask for no CPU: the CPUs of the cluster
    this process is connected to (None, Ray Data's default, before `ray.init`). Nothing
    else bounds such reads, and Ray starts a worker process for each one in flight: 22
    for an epoch of 27 shards on 2 CPUs (deqray.data.vision's resources note)."""
    import ray

    if not ray.is_initialized():
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_summary() -> str:
    """One line about the cluster this process is connected to: nodes, CPUs, GPUs, address."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    address = getattr(ctx, "gcs_address", None) or "local"
    return (
        f"Ray cluster at {address}: {len(nodes)} node{'s' * (len(nodes) != 1)}, "
        f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
    )


def storage_warning(uri: str) -> str | None:
    """A warning when `uri` is a plain local path and the cluster has more than one node:
    checkpoints and results written there by one node are invisible to the others
    unless the path is on a mount every node shares."""
    import ray

    if "://" in uri and not uri.startswith("file://"):
        return None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return None
    return (
        f"storage {uri} is a local path on a cluster of {len(nodes)} nodes: every node must "
        "see it (a shared file system); otherwise pass --storage s3://<bucket>/<prefix>"
    )
