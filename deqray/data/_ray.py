"""Connecting to Ray: the running cluster when there is one, a local one otherwise."""

from __future__ import annotations

import os


def connect(num_cpus: int | None = None, **kwargs):
    """ray.init() that joins a cluster (RAY_ADDRESS or a running local head) or starts one.

    Inside a job submitted to a cluster, `num_cpus` must not be passed (Ray
    refuses it), so it is only used when a new local instance is started.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs.setdefault("log_to_driver", True)
    if os.environ.get("RAY_ADDRESS"):
        return ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    try:
        return ray.init(address="auto", **kwargs)
    except (ConnectionError, RuntimeError):
        return ray.init(num_cpus=num_cpus, **kwargs)
