"""A real MLflow tracking server on 127.0.0.1 for the tests, and reads of what it holds.

`mlflow server` with a SQLite backend and artifacts in a temporary
directory, in a process group of its own (its web workers stop with it),
stopped by that group's id and removed at the end of the module (or the
session) that asked for it. The server starts in 10-20 s on a quiet 2-core machine (database
migrations, then the app's imports); minutes beside other tests.

Fixtures, each the server's http:// address: `mlflow_uri` (module; tests/test_tune.py's
study starts one) and `session_mlflow_uri` (session: the shared language-model run of
tests/shared_runs.py tracks to it, and tests/test_tracking.py reads it there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import free_port


@pytest.fixture(scope="module")
def mlflow_uri() -> Iterator[str]:
    with serve() as uri:
        yield uri


@pytest.fixture(scope="session")
def session_mlflow_uri() -> Iterator[str]:
    with serve() as uri:
        yield uri


@contextlib.contextmanager
def serve() -> Iterator[str]:
    pytest.importorskip("mlflow")  # deqray[dev] installs it; the suite runs with dev
    root = Path(tempfile.mkdtemp(prefix="deqray-mlflow-"))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    saved = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no network here to send it to
    # no job runner (MLflow's GenAI evaluation jobs): two fewer processes on 2 cores
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(uri, proc, root / "server.log", log)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if saved is None:
            os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
        else:
            os.environ["MLFLOW_DISABLE_TELEMETRY"] = saved
        shutil.rmtree(root, ignore_errors=True)


def _wait_healthy(uri: str, proc: subprocess.Popen, log_path: Path, log) -> None:
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.flush()
            pytest.fail(f"mlflow server did not start:\n{log_path.read_text()}")
        time.sleep(0.5)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's (step, value) points, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
