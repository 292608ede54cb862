"""Connecting to Ray: the running cluster when there is one, a local one otherwise."""

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
