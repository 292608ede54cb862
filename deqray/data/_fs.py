"""Paths on any filesystem pyarrow knows (local, s3://, gs://, ...): safe writes, retried I/O.

Every output file is written under a temporary name in the same directory
and moved to its final name only when complete, so a reader (or a re-run)
never mistakes a half-written file for a finished one.

Object stores have outages; a run should ride out a short one and give up
clearly on a long one. Every operation of a `Location` therefore retries
*transient* storage errors (the store unreachable, a reset connection, HTTP
5xx, throttling) with exponential backoff, for at most a retry budget of
seconds: `DEQRAY_STORAGE_RETRY_S` in the environment, default 60. Past
the budget it raises `StorageUnavailable` (a `DataError` and an `OSError`)
naming the URI. Other errors (a missing file, access denied, a missing
bucket) are not retried: waiting would not change them. pyarrow's S3 client
already retries a refused connection for about 6 s inside each attempt, so
an attempt against a store that is down takes that long.

    locate("s3://bucket/run/status.json").write_bytes(data)   # atomic and retried
    locate("s3://bucket/run/ckpt/state.pt").upload("/tmp/state.pt")  # a local file, likewise
    retrying("upload", uri, lambda: fs.copy_file(a, b))        # any other call
    for batch in retrying_iter("read", uri, open_batches): ...  # a stream, resumed after errors

S3 settings come from the standard AWS environment, read by pyarrow's
`FileSystem.from_uri` each time a location is opened: `AWS_ENDPOINT_URL`
(an S3-compatible server), `AWS_REGION` / `AWS_DEFAULT_REGION`, and the
credentials (environment keys, or else the instance profile).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pyarrow.fs as pafs

TMP_MARK = ".tmp-"
RETRY_ENV = "DEQRAY_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 60.0
FIRST_DELAY_S = 0.5  # the first wait; each next one doubles, up to MAX_DELAY_S
MAX_DELAY_S = 8.0
UPLOAD_CHUNK = 16 << 20

log = logging.getLogger("deqray.storage")
T = TypeVar("T")


class DataError(Exception):
    """Bad input or output of a data pipeline; the message names the file."""


class StorageUnavailable(DataError, OSError):
    """The storage stayed unreachable for the whole retry budget; the message names the URI.

    Also an OSError, so that code which treats a failed write as an I/O error
    keeps doing so.
    """


# Errors that say "not now" rather than "never": what pyarrow's S3 client
# reports when the store is unreachable, resets the connection, is
# overloaded or throttles (AWS error names, curl's connection failures).
_TRANSIENT_MARKS = (
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "INTERNAL_FAILURE",
    "curlCode: 7,",  # could not connect
    "curlCode: 28,",  # timed out
    "curlCode: 52,",  # empty reply
    "curlCode: 55,",  # send failed
    "curlCode: 56,",  # receive failed (connection reset)
    "Connection reset",
    "Broken pipe",
)
_HTTP_5XX = re.compile(r"HTTP (?:status|response code)[: ]*5\d\d")
_TRANSIENT_ERRNO = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}
_OBJECT_STORES = ("s3", "gcs")
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    StorageUnavailable,  # an inner call already spent the budget
)


def retry_budget() -> float:
    """Seconds a storage operation keeps retrying: $DEQRAY_STORAGE_RETRY_S, default 60."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return DEFAULT_RETRY_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also refuses nan
        raise DataError(f"{RETRY_ENV}={text!r}: expected a number of seconds >= 0")
    return value


def is_transient(error: BaseException) -> bool:
    """True for a storage error worth retrying (the store unreachable or overloaded)."""
    if not isinstance(error, OSError) or isinstance(error, _PERMANENT):
        return False
    if error.errno in _TRANSIENT_ERRNO:
        return True
    text = str(error)
    return any(m in text for m in _TRANSIENT_MARKS) or bool(_HTTP_5XX.search(text))


def retrying(what: str, uri: str, fn: Callable[[], T], *, budget_s: float | None = None) -> T:
    """`fn()`, retried with exponential backoff while it fails with a transient storage error.

    what: the operation, for messages ("write", "read", ...); uri: what it is
    about. The waits double from 0.5 s up to 8 s, each drawn between half and
    all of that (so that many workers do not retry in step). It gives up when
    the next attempt would start more than `budget_s` (default
    `retry_budget()`) after the first, raising `StorageUnavailable` naming
    `uri`. Errors that are not transient propagate unchanged at once.
    """
    budget = retry_budget() if budget_s is None else budget_s
    start = time.monotonic()
    delay = FIRST_DELAY_S
    attempt = 1
    while True:
        try:
            return fn()
        except OSError as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - start
            wait = delay * random.uniform(0.5, 1.0)
            if elapsed + wait > budget:
                raise StorageUnavailable(
                    f"{uri}: {what} failed: the storage was unreachable for {elapsed:.1f} s "
                    f"({attempt} attempt{'s' * (attempt > 1)}; retry budget {budget:g} s, "
                    f"set {RETRY_ENV} to change it): {_brief(e)}"
                ) from None
            log.warning("%s: %s failed (%s); attempt %d in %.1f s", uri, what, e, attempt + 1, wait)
            time.sleep(wait)
            delay = min(2 * delay, MAX_DELAY_S)
            attempt += 1


_END = object()


def retrying_iter(
    what: str, uri: str, open_iter: Callable[[], Iterator[T]], *, budget_s: float | None = None
) -> Iterator[T]:
    """The items of `open_iter()`, each step retried like `retrying`.

    A transient error, whether it comes from opening the source or from any
    later item, makes a new `open_iter()` whose first items, those already
    yielded, are skipped: `open_iter` must yield the same items each time (a
    file read in the same chunks). The retry budget applies to each item, so
    a long read survives several short outages.
    """
    done = 0
    it: Iterator[T] | None = None

    def step():
        nonlocal it
        try:
            if it is None:
                it = open_iter()
                for _ in range(done):
                    if next(it, _END) is _END:
                        raise DataError(f"{uri}: shorter on a reread after a storage error")
            return next(it, _END)
        except OSError:
            it = None  # reopened on the next attempt
            raise

    while True:
        item = retrying(what, uri, step, budget_s=budget_s)
        if item is _END:
            return
        done += 1
        yield item


def _brief(error: BaseException, limit: int = 160) -> str:
    """What an error says about why, short enough that the URI before it survives Ray's cut
    of a worker's error to its last 500 characters. For pyarrow's S3 errors, that is from
    "AWS Error" on: the key and bucket before it are the URI again."""
    text = " ".join(str(error).split())
    text = text[text.index("AWS Error") :] if "AWS Error" in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it, printable as the URI the user gave."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    def _info(self) -> pafs.FileInfo:
        return retrying("stat", self.uri, lambda: self.fs.get_file_info(self.path))

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise DataError(f"{self.uri}: not a file")
        return int(info.size)

    def list(self) -> list[str]:
        """Names directly inside this directory, sorted."""
        if not self.is_dir():
            raise DataError(f"{self.uri}: not a directory")
        selector = pafs.FileSelector(self.path, recursive=False)
        infos = retrying("list", self.uri, lambda: self.fs.get_file_info(selector))
        return sorted(posixpath.basename(i.path) for i in infos)

    def mkdir(self) -> None:
        retrying("mkdir", self.uri, lambda: self.fs.create_dir(self.path, recursive=True))

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as fh:
                return fh.read()

        return retrying("read", self.uri, read)

    def write_bytes(self, data: bytes) -> None:
        """Write atomically (a temporary name, then a move), retrying transient errors.

        A retry starts over under a new temporary name, so an attempt cut off
        half way can never be moved into place; its leftover is removed once
        a later attempt succeeds (and is recognisable by TMP_MARK if even
        that fails).
        """
        self._write_atomic("write", lambda fh: fh.write(data))

    def upload(self, local_path: str | os.PathLike) -> None:
        """Copy a local file here, atomically and retried like `write_bytes`, in chunks
        (a checkpoint need not fit in memory twice)."""

        def fill(fh) -> None:
            with open(local_path, "rb") as src:
                while chunk := src.read(UPLOAD_CHUNK):
                    fh.write(chunk)

        self._write_atomic("upload", fill)

    def _write_atomic(self, what: str, fill: Callable[..., object]) -> None:
        parent = posixpath.dirname(self.path)
        name = posixpath.basename(self.path)
        tried: list[str] = []

        def attempt() -> None:
            tmp = posixpath.join(parent, f"{TMP_MARK}{uuid.uuid4().hex}-{name}")
            tried.append(tmp)
            if self.fs.type_name not in _OBJECT_STORES:  # keys need no parent directory
                self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(tmp) as fh:
                fill(fh)
            self.fs.move(tmp, self.path)

        retrying(what, self.uri, attempt)
        for tmp in tried[:-1]:
            try:
                self.fs.delete_file(tmp)
            except OSError:  # never written, or the store went away again: harmless
                pass

    def remove(self) -> None:
        def remove() -> None:
            info = self.fs.get_file_info(self.path)
            try:
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(self.path)
                elif info.type == pafs.FileType.File:
                    self.fs.delete_file(self.path)
            except FileNotFoundError:  # an earlier attempt deleted it, unacknowledged
                pass

        retrying("remove", self.uri, remove)

    def sha256(self) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            with self.fs.open_input_stream(self.path) as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            return h.hexdigest()

        return retrying("read", self.uri, digest)

    def __str__(self) -> str:
        return self.uri


def locate(uri: str | os.PathLike | Location) -> Location:
    """A Location for a local path or a URI (s3://bucket/key, gs://..., file:///...)."""
    if isinstance(uri, Location):
        return uri
    uri = os.fspath(uri)
    if "://" in uri:
        # from_uri may ask the store (an S3 bucket's region): retried like any call
        fs, path = retrying("open", uri, lambda: pafs.FileSystem.from_uri(uri))
        return Location(fs, path, uri)
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def write_bytes(uri: str | os.PathLike | Location, data: bytes) -> None:
    """Write `data` to `uri` atomically, retrying transient storage errors (see the module doc)."""
    locate(uri).write_bytes(data)


def read_bytes(uri: str | os.PathLike | Location) -> bytes:
    """The bytes at `uri`, retrying transient storage errors."""
    return locate(uri).read_bytes()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
