"""TensorBoard as a user starts it, read through its own HTTP API.

    with tensorboard_server("runs/quickstart-...") as url:
        runs = scalar_tags(url)     # {run name: [tag, ...]} as TensorBoard lists them

The server is a `tensorboard` subprocess on a free port of 127.0.0.1, stopped
by its PID on leaving the block. benchmarks/tensorboard_screenshot.py uses it too.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from tests.dashboard_client import get_json
from tests.s3_server import free_port


@contextlib.contextmanager
def tensorboard_server(logdir: str, timeout: float = 60.0) -> Iterator[str]:
    """A TensorBoard on `logdir`; yields its base URL once it has loaded the runs."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast=false",  # the Python loader: no data-server binary needed
        "--reload_interval=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_loaded(proc, url, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_loaded(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Until the runs and their tags read the same twice, a reload apart."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"tensorboard exited {proc.returncode}: {proc.stdout.read()}")
        try:
            now = scalar_tags(url)
        except (urllib.error.URLError, ConnectionError):
            now = None
        if now and now == last:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"tensorboard on {url} did not load in {timeout:g} s: {now}")
        last = now
        time.sleep(1.5)


def scalar_tags(url: str) -> dict[str, list[str]]:
    """{run: its scalar tags} for every run TensorBoard lists (`/data/runs`)."""
    runs = get_json(f"{url}/data/runs")
    tags = get_json(f"{url}/data/plugin/scalars/tags")
    return {run: sorted(tags.get(run, {})) for run in runs}


def scalars(url: str, run: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar curve."""
    from urllib.parse import urlencode

    rows = get_json(f"{url}/data/plugin/scalars/scalars?{urlencode({'run': run, 'tag': tag})}")
    return [(int(step), float(value)) for _, step, value in rows]
