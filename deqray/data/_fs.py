"""Paths on any filesystem pyarrow knows (local, s3://, gs://, ...), and safe writes.

Every output file is written under a temporary name in the same directory
and moved to its final name only when complete, so a reader (or a re-run)
never mistakes a half-written file for a finished one.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

TMP_MARK = ".tmp-"


class DataError(Exception):
    """Bad input or output of a data pipeline; the message names the file."""


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

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.File:
            raise DataError(f"{self.uri}: not a file")
        return int(info.size)

    def list(self) -> list[str]:
        """Names directly inside this directory, sorted."""
        if not self.is_dir():
            raise DataError(f"{self.uri}: not a directory")
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(posixpath.basename(i.path) for i in infos)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def write_bytes(self, data: bytes) -> None:
        """Write atomically: a temporary name, then a move."""
        parent = posixpath.dirname(self.path)
        self.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(
            parent, f"{TMP_MARK}{uuid.uuid4().hex}-{posixpath.basename(self.path)}"
        )
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        self.fs.move(tmp, self.path)

    def remove(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path) as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def __str__(self) -> str:
        return self.uri


def locate(uri: str | os.PathLike | Location) -> Location:
    """A Location for a local path or a URI (s3://bucket/key, gs://..., file:///...)."""
    if isinstance(uri, Location):
        return uri
    uri = os.fspath(uri)
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return Location(fs, path, uri)
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
