"""A PostgreSQL server on 127.0.0.1 for the tests: Optuna's RDB storage as a cluster would use it.

Debian's `postgresql` package (installed by .ci/run) provides the programs,
in /usr/lib/postgresql/<version>/bin, which is not on PATH. The tests'
server is none of Debian's clusters: `initdb` makes a fresh one in a
temporary directory and `postgres` serves it on a free port, TCP on
127.0.0.1 only (its Unix socket in the data directory), without fsync (the
data is thrown away). It is our child process, stopped by its PID (SIGINT:
PostgreSQL's fast shutdown).

PostgreSQL refuses to run as root. As root (CI), both programs run as the
`postgres` user that Debian's package creates (`subprocess.Popen(user=...)`,
no su/sudo), and the directory is handed to that user; as anyone else they
run as that user. Clients connect as the database superuser `deqray`,
trusted on 127.0.0.1 (no password: nothing else can reach the server).

Fixtures (registered in tests/conftest.py):

* `pg_server` (session): the server.
* `pg_url` (function): a fresh database, as an SQLAlchemy URL for Optuna,
  "postgresql+psycopg2://deqray@127.0.0.1:<port>/<name>".
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.s3_server import free_port

SUPERUSER = "deqray"


def pg_bin(program: str) -> str:
    """A PostgreSQL program: on PATH, else the newest /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(program)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{program}")
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL's {program} not found (apt-get install -y postgresql; see .ci/run)"
        )
    return max(candidates, key=lambda p: [int(x) for x in re.findall(r"\d+", p)])


class PostgresServer:
    def __init__(self):
        self.workdir = Path(tempfile.mkdtemp(prefix="deqray-pg-"))
        self.data = self.workdir / "data"
        self.port = free_port()
        self._proc: subprocess.Popen | None = None
        self._as: dict = {}
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root and there is no 'postgres' user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)"
                ) from None
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> PostgresServer:
        log = self.workdir / "initdb.log"
        with open(log, "wb") as fh:
            done = subprocess.run(
                [pg_bin("initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust"]
                + ["-E", "UTF8", "--no-sync", "--no-instructions"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **self._as,
            )
        if done.returncode:
            raise RuntimeError(f"initdb failed:\n{log.read_text()}")
        self._log = open(self.workdir / "postgres.log", "ab")  # closed in close()
        self._proc = subprocess.Popen(
            [pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port)]
            + ["-c", "listen_addresses=127.0.0.1", "-k", str(self.data)]
            + ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=50"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **self._as,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited ({self._proc.returncode}):\n"
                    + (self.workdir / "postgres.log").read_text()
                )
            try:
                psycopg2.connect(**self._dsn("postgres")).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _dsn(self, dbname: str) -> dict:
        return {"host": self.host, "port": self.port, "user": SUPERUSER, "dbname": dbname}

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg2

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(**self._dsn("postgres"))
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg2://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions, exits
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if self._proc is not None:
            self._log.close()
        self._proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server):
    return pg_server.create_database()
