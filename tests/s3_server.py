"""An S3-protocol server on 127.0.0.1 for the tests, whose front door can go down and come back.

moto's standalone server (`moto[server]`) holds the objects, in memory.
Clients do not talk to it directly: they reach it through socat on a second
port, and that port is what `AWS_ENDPOINT_URL` names. An outage stops socat
(new connections are refused, open ones cut); `up()` starts it again on the
same port and the same objects are there, as with a real store after a
network outage. (Stopping moto itself would lose every object: it keeps
nothing on disk.) The tests themselves inspect the store through
`backend()`, a boto3 client on moto's own port, which works during an outage.

Both processes are ours and are stopped by their PIDs (socat with its
process group: it forks a child per connection).

Fixtures (registered in tests/conftest.py):

* `s3_server` (session): the server, with the settings a user would set put
  in `os.environ` for the whole session: AWS_ENDPOINT_URL, keys, region,
  AWS_EC2_METADATA_DISABLED (so that nothing looks for an instance profile
  off this machine). `ray_session` depends on it, so Ray's workers, which
  inherit the environment of the process that starts Ray, see them too.
* `s3_bucket` (function): a fresh bucket, as "s3://<name>"; the server is up
  again after the test, whatever the test did to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {timeout} s")


def _stop(proc: subprocess.Popen | None, *, group: bool = False) -> None:
    """Stop one of our processes (and, for socat, its connection children) by PID."""
    if proc is None or proc.poll() is not None:
        return
    kill = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    try:
        kill(signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        kill(signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class S3Server:
    """moto behind socat on 127.0.0.1; `down()` / `up()` for outages on the same port."""

    def __init__(self, workdir: str | Path | None = None):
        if shutil.which("socat") is None:
            raise RuntimeError("socat is not installed (apt-get install -y socat; see .ci/run)")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="deqray-s3-"))
        self.backend_port = free_port()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._moto: subprocess.Popen | None = None
        self._front: subprocess.Popen | None = None
        self._log = open(self.workdir / "server.log", "ab")  # closed in close()

    # ---- life cycle ------------------------------------------------------------------ #

    def start(self) -> S3Server:
        self._moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.backend_port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _wait_listening(self.backend_port, self._moto, "moto_server")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.backend_port}/moto-api/") as r:
            assert r.status == 200
        self.up()
        return self

    def up(self) -> None:
        """Open the front door (again) on the same port."""
        if self.is_up:
            return
        self._front = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
                f"TCP:127.0.0.1:{self.backend_port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the children go with it
        )
        _wait_listening(self.port, self._front, "socat")

    def down(self) -> None:
        """An outage: refuse new connections and cut the open ones. The objects stay."""
        _stop(self._front, group=True)
        self._front = None

    @property
    def is_up(self) -> bool:
        return self._front is not None and self._front.poll() is None

    @contextmanager
    def outage(self):
        self.down()
        try:
            yield
        finally:
            self.up()

    def close(self) -> None:
        self.down()
        _stop(self._moto)
        self._moto = None
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- what a user sets, and what the tests look with ------------------------------ #

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS settings that point a client (pyarrow, boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "deqray-test",
            "AWS_SECRET_ACCESS_KEY": "deqray-test-secret",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def backend(self):
        """A boto3 S3 client on moto's own port: it sees the objects during an outage too."""
        import boto3

        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.backend_port}",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        )

    def create_bucket(self, name: str | None = None) -> str:
        """A new bucket; its URI "s3://<name>"."""
        name = name or f"deqray-{uuid.uuid4().hex[:12]}"
        self.backend().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, uri: str) -> list[str]:
        """Every key under an s3:// URI (bucket or prefix), sorted, read from the backend."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        pages = (
            self.backend().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    try:
        server.start()
        os.environ.update(server.env)
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.close()


@pytest.fixture
def s3_bucket(s3_server):
    uri = s3_server.create_bucket()
    try:
        yield uri
    finally:
        s3_server.up()  # a test that ended during an outage leaves the server usable
