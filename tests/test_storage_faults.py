"""Storage outages: the file layer retries with backoff, then fails by name; preprocessing
leaves no manifest when it fails, and a rerun completes.

The outage is real: the S3 server's front door (tests/s3_server.py) is
stopped, so connections are refused and open ones cut, and started again on
the same port with the objects intact. pyarrow's S3 client itself retries a
refused connection for about 6 s inside each call, so an outage that deqray's
own retries must ride out lasts longer than that (8 s here).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from deqray.cli import main as deqray
from deqray.data import DataError, load_manifest, locate
from deqray.data._fs import (
    DEFAULT_RETRY_S,
    RETRY_ENV,
    StorageUnavailable,
    is_transient,
    retry_budget,
    retrying,
    write_bytes,
)
from deqray.data.digits import write_digits
from deqray.data.markov import write_markov_corpus

OUTAGE_S = 8.0  # longer than pyarrow's own ~6 s of connection retries
MARKOV = {"tokens": 6000, "vocab_size": 40, "branching": 6, "seed": 3, "shard_tokens": 300}


def files(server, uri: str) -> list[str]:
    return [k for k in server.keys(uri) if not k.endswith("/")]  # not directory markers


class OutageWhen:
    """A thread that stops the server once a key matching `trigger` exists under `uri`.

    Records whether the manifest existed at that moment; keeps the server down
    for `seconds`, or (None) until `end()`.
    """

    def __init__(self, server, uri: str, trigger: str, seconds: float | None):
        self.server, self.uri, self.trigger, self.seconds = server, uri, trigger, seconds
        self.began = threading.Event()
        self._end = threading.Event()
        self.keys_at_start: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not self._end.is_set():
            keys = files(self.server, self.uri)
            if any(self.trigger in k and ".tmp-" not in k for k in keys):
                self.server.down()
                self.keys_at_start = keys
                self.began.set()
                self._end.wait(self.seconds)
                self.server.up()
                return
            time.sleep(0.01)

    def end(self) -> None:
        self._end.set()
        self._thread.join(timeout=30)

    @property
    def manifest_existed(self) -> bool:
        return any(k.endswith("manifest.json") for k in self.keys_at_start)


# --------------------------------------------------------------------------- #
# the retry rule itself
# --------------------------------------------------------------------------- #


def test_transient_errors_are_told_from_permanent_ones():
    refused = (
        "When uploading part for key 'a/b' in bucket 'x': AWS Error NETWORK_CONNECTION during "
        "UploadPart operation: curlCode: 7, Could not connect to server"
    )
    assert is_transient(OSError(refused))
    assert is_transient(OSError("AWS Error SLOW_DOWN during PutObject operation: Reduce rate"))
    assert is_transient(OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject operation"))
    assert is_transient(OSError(errno.ECONNRESET, "Connection reset by peer"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation"))
    assert not is_transient(OSError("AWS Error NO_SUCH_BUCKET during HeadBucket operation"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone", "x"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(ValueError(refused))  # only I/O errors
    assert not is_transient(StorageUnavailable(refused))  # a budget already spent


def test_retry_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert retry_budget() == DEFAULT_RETRY_S == 60
    monkeypatch.setenv(RETRY_ENV, "2.5")
    assert retry_budget() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(RETRY_ENV, bad)
        with pytest.raises(DataError, match=rf"{RETRY_ENV}='{bad}': expected a number of seconds"):
            retry_budget()


def test_backoff_doubles_and_the_budget_ends_it(caplog):
    calls: list[float] = []

    def flaky(failures: int):
        def call():
            calls.append(time.monotonic())
            if len(calls) <= failures:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            return "done"

        return call

    with caplog.at_level(logging.WARNING, logger="deqray.storage"):
        assert retrying("write", "s3://b/k", flaky(3), budget_s=30) == "done"
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    # waits of 0.5, 1, 2 s, each drawn between half and all of that
    for gap, full in zip(gaps, (0.5, 1.0, 2.0), strict=True):
        assert 0.5 * full <= gap < full + 0.25, gaps
    assert [r.message.split("; ")[-1].split(" in ")[0] for r in caplog.records] == [
        "attempt 2",
        "attempt 3",
        "attempt 4",
    ]

    calls.clear()
    with pytest.raises(StorageUnavailable, match=r"s3://b/k: write failed: .*retry budget 1 s"):
        retrying("write", "s3://b/k", flaky(100), budget_s=1)
    assert 2 <= len(calls) <= 3  # waits of 0.25..0.5 s, then 0.5..1 s, within 1 s
    calls.clear()

    def denied():
        calls.append(time.monotonic())
        raise PermissionError(errno.EACCES, "Access denied")

    with pytest.raises(PermissionError):  # not transient: no retry
        retrying("write", "s3://b/k", denied, budget_s=30)
    assert len(calls) == 1


# --------------------------------------------------------------------------- #
# real outages of the S3 server
# --------------------------------------------------------------------------- #


def test_a_write_rides_out_an_outage_shorter_than_the_budget(s3_server, s3_bucket, caplog):
    uri = f"{s3_bucket}/run/status.json"
    s3_server.down()
    timer = threading.Timer(OUTAGE_S, s3_server.up)
    timer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="deqray.storage"):
            write_bytes(uri, b'{"step": 7}')
    finally:
        timer.join()
    assert locate(uri).read_bytes() == b'{"step": 7}'
    # deqray's retry carried it, not pyarrow's own: at least one retry was logged
    retried = [r for r in caplog.records if r.name == "deqray.storage"]
    assert retried and "run/status.json: write failed" in retried[0].message
    assert files(s3_server, s3_bucket) == ["run/status.json"]


def test_a_write_past_the_budget_fails_naming_the_uri_and_leaves_nothing(
    s3_server, s3_bucket, monkeypatch
):
    monkeypatch.setenv(RETRY_ENV, "1")
    uri = f"{s3_bucket}/run/checkpoint.pt"
    with s3_server.outage():
        with pytest.raises(StorageUnavailable) as caught:
            write_bytes(uri, b"weights")
    message = str(caught.value)
    assert message.startswith(f"{uri}: write failed: the storage was unreachable")
    assert f"retry budget 1 s, set {RETRY_ENV}" in message and "NETWORK_CONNECTION" in message
    assert isinstance(caught.value, DataError) and isinstance(caught.value, OSError)
    assert files(s3_server, s3_bucket) == []  # not the file, not a temporary one
    write_bytes(uri, b"weights")  # the server is back: the same call works
    assert files(s3_server, s3_bucket) == ["run/checkpoint.pt"]


def test_permanent_errors_are_not_retried(s3_server, caplog):
    with caplog.at_level(logging.WARNING, logger="deqray.storage"):
        with pytest.raises(OSError, match="NO_SUCH_BUCKET") as caught:
            write_bytes("s3://deqray-no-such-bucket/x", b"x")
    assert not isinstance(caught.value, StorageUnavailable)
    assert not [r for r in caplog.records if r.name == "deqray.storage"]


# --------------------------------------------------------------------------- #
# preprocessing through an outage
# --------------------------------------------------------------------------- #


def test_markov_preprocessing_goes_on_through_an_outage(ray_session, s3_server, s3_bucket):
    """Ray tasks writing shards, then the driver's manifest: all across an 8 s outage."""
    uri = f"{s3_bucket}/markov"
    outage = OutageWhen(s3_server, uri, "/shard-", OUTAGE_S)
    try:
        m = write_markov_corpus(None, uri, progress=False, **MARKOV)
    finally:
        outage.end()
    assert outage.began.is_set() and not outage.manifest_existed
    total = sum(len(s.shards) for s in m.splits.values())
    assert len([k for k in outage.keys_at_start if "/shard-" in k]) < total
    load_manifest(uri, verify="checksum")
    listed = {f"markov/{s.path}" for s in m.splits["train"].shards}
    assert listed <= set(files(s3_server, uri))
    assert not [k for k in files(s3_server, uri) if ".tmp-" in k]


def test_preprocess_past_the_budget_leaves_no_manifest_and_a_rerun_completes(
    ray_session, s3_server, s3_bucket, tmp_path
):
    """`deqray preprocess markov` as a user runs it, with a 1 s retry budget, meets an outage."""
    uri = f"{s3_bucket}/markov"
    argv = [sys.executable, "-m", "deqray.cli", "preprocess", "markov", "--out", uri]
    argv += [arg for k, v in MARKOV.items() for arg in ("--set", f"{k}={v}")]
    env = {**os.environ, RETRY_ENV: "1", "RAY_ADDRESS": "local"}  # its own Ray, its own budget
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    outage = OutageWhen(s3_server, uri, "/shard-", None)
    try:
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    finally:
        outage.end()
    assert outage.began.is_set(), run.stderr[-3000:]
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"deqray preprocess: {uri}/" in run.stderr
    assert "write failed: the storage was unreachable" in run.stderr
    assert "retry budget 1 s" in run.stderr
    assert not [k for k in s3_server.keys(uri) if k.endswith("manifest.json")]
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(uri)

    # the rerun (default budget, server up) cleans the leftovers and completes
    set_args = [arg for k, v in MARKOV.items() for arg in ("--set", f"{k}={v}")]
    assert deqray(["preprocess", "markov", "--out", uri, *set_args]) == 0
    m = load_manifest(uri, verify="checksum")
    local = write_markov_corpus(None, str(tmp_path / "local"), progress=False, **MARKOV)
    assert m.splits == local.splits
    listed = {f"markov/{s.path}" for split in m.splits.values() for s in split.shards}
    assert set(files(s3_server, uri)) == listed | {"markov/manifest.json", "markov/vocab.txt"}


def test_digits_preprocessing_past_the_budget_and_the_rerun(s3_server, s3_bucket, monkeypatch):
    """The image path, written by the driver itself: same promise."""
    uri = f"{s3_bucket}/digits"
    monkeypatch.setenv(RETRY_ENV, "1")
    outage = OutageWhen(s3_server, uri, "train/shard-", None)
    try:
        with pytest.raises(StorageUnavailable, match=rf"{uri}/\S+: write failed"):
            write_digits(None, uri, shard_mb=0.005, progress=False)
    finally:
        outage.end()
    assert outage.began.is_set()
    assert not [k for k in s3_server.keys(uri) if k.endswith("manifest.json")]
    monkeypatch.delenv(RETRY_ENV)
    m = write_digits(None, uri, shard_mb=0.005, progress=False)
    assert load_manifest(uri, verify="checksum").splits == m.splits
    listed = {f"digits/{s.path}" for split in m.splits.values() for s in split.shards}
    assert set(files(s3_server, uri)) == listed | {"digits/manifest.json"}
