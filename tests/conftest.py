"""Test session fixtures: one local Ray instance for the whole session, cleaned up by us.

Ray is started once (`ray_session`), with the real 2 CPUs of this machine
and a custom TRAIN_DRIVER resource for trial drivers (docs/ray-notes.md). It is
shut down at the end of the session by the driver that started it: that
stops the processes of this instance only (never `ray stop`).

Servers for the storage tests live in their own modules: `s3_server` /
`s3_bucket` (tests/s3_server.py), `pg_server` / `pg_url`
(tests/pg_server.py) and `mlflow_uri` / `session_mlflow_uri`
(tests/mlflow_server.py: one server per module that asks, and one for the
shared runs). Ray starts after the S3 server, so that its workers
inherit the S3 settings the session puts in the environment, as a user's
would.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

from tests.mlflow_server import mlflow_uri, session_mlflow_uri  # noqa: F401 (fixtures)
from tests.pg_server import pg_server, pg_url  # noqa: F401 (fixtures)
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 (fixtures)

# Every Ray the tests start, in this process or in a subprocess (`deqray train`
# run as a user runs it), is a new local instance: ray.init(address="auto")
# would join any Ray running on the machine, another test session's (pytest
# -n) or another program's. The cluster tests name their cluster's address.
os.environ["RAY_ADDRESS"] = "local"

# Two pytest-xdist processes share the machine's 2 cores. torch's OpenMP pool
# would take both cores in each process, and the two pools' spinning threads
# slowed compute-bound tests 10-30x (tests/test_transformer.py's overfit test:
# 5 s alone, 170 s beside another test process). One thread per process;
# subprocesses and Ray workers inherit OMP_NUM_THREADS.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# Ray Train's controller watches for spot-instance preemption notices: an actor
# per run, which a test on this machine only pays for.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Under `-n 2 --dist loadfile` a file runs whole in one process (its module
# fixtures are built once). The files that read tests/shared_runs.py's runs
# count as one file, so that each shared run is trained once, not once per
# process. (xdist's `--dist loadgroup` would do this with marks, but xdist 3.8
# renames node ids in a way that pytest 9 no longer reads: the groups are
# silently ignored.)
SHARED_RUN_FILES = frozenset(
    {
        "test_train.py",
        "test_tasks_contract.py",
        "test_examples.py",
        "test_evaluate.py",
        "test_tracking.py",
    }
)


# The longest files first (seconds on 2 cores, 2026-12-04: 1,010 s in all), the rest
# in collection order: xdist hands out files in that order, and its default order
# (most tests first) left one process alone for minutes at the end of the suite with
# the few-test, long-running files it had kept for last.
LONGEST_FIRST = (
    "shared runs",  # SHARED_RUN_FILES: ~750
    "test_storage_train.py",  # ~235
    "test_storage_tune.py",  # ~230
    "test_cluster.py",  # ~210
    "test_tune.py",  # ~125
    "test_storage_faults.py",  # ~90
    "test_data_vision.py",  # ~75
    "test_data_segmentation.py",  # ~35
)


def _file_rank(path: str) -> int:
    name = path.rsplit("/", 1)[-1]
    key = "shared runs" if name in SHARED_RUN_FILES else name
    return LONGEST_FIRST.index(key) if key in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _file_rank(item.nodeid.split("::", 1)[0]))  # stable


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # the collection's order: LONGEST_FIRST

    class SharedRunsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "tests/shared_runs" if file.rsplit("/", 1)[-1] in SHARED_RUN_FILES else file

    return SharedRunsTogether(config, log)


@pytest.fixture(scope="session")
def ray_session(request):
    request.getfixturevalue("s3_server")  # first: Ray's workers inherit its settings
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    if ray.is_initialized():  # someone else's instance: use it, leave it
        yield ray
        return
    with _state_api_that_refuses() as address:
        env = os.environ.get(STATE_API)
        os.environ[STATE_API] = address  # for the raylet, hence every worker, of this Ray only
        try:
            ray.init(
                num_cpus=2,
                resources={"TRAIN_DRIVER": 4},
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        finally:
            if env is None:
                del os.environ[STATE_API]
            else:
                os.environ[STATE_API] = env
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session Ray's GCS address. A `deqray` subprocess given it as RAY_ADDRESS joins
    this instance, as a user's command joins a running cluster, instead of starting a
    local one of its own (about half of a `deqray preprocess digits`: 8 of its 16 CPU-s
    are its instance's GCS, raylet, dashboard and agents; a `deqray train` or `deqray
    tune` about 12 CPU-s and 11 s: docs/ray-notes.md, "What a fit costs on 2 CPUs").
    Tests that check the start of a local instance keep RAY_ADDRESS=local."""
    return ray_session.get_runtime_context().gcs_address


# Ray Train's PlacementGroupCleaner (a detached actor per fit) asks the state API
# whether its controller is alive and removes the run's placement group when the
# answer is "no such actor". Without a dashboard this instance has no state API,
# and Ray's address lookup may land on http://127.0.0.1:8265, where another Ray
# on the machine (a `deqray train` run by a test as a user runs it) has its
# dashboard: that one knows no such actor, and the cleaner killed a live run's
# workers (docs/ray-notes.md). Pointed at a port that refuses, the cleaner's
# query fails, which it takes as "unknown" and asks again.
STATE_API = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def _state_api_that_refuses():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound and never listening: connections are refused
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def one_torch_thread():
    """torch at 1 thread for the test: a training trajectory depends on the
    order of float reductions, hence on the thread count; a test whose
    thresholds were checked over seeds at one count pins it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ray_clean(ray_session):
    """Ray, with placement groups that a test leaves behind removed afterwards.

    A fit that fails inside the Ray Train controller can leave its placement
    group holding the CPUs, and every later Ray test would then hang.
    """
    yield ray_session
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in placement_group_table().items():
        if info.get("state") != "REMOVED":
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            except Exception:  # removed meanwhile
                pass
