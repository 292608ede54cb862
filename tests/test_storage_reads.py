"""Shard reads through an outage: the LM lanes' `_read_range` and the vision reader's
`_read_shard` retry like every other storage call (deqray.data._fs).

The shards are small parquet files written to the test S3 server
(tests/s3_server.py); the outage is real (its front door stopped for 7 s,
longer than an attempt with pyarrow's own connection retries), and each
reader starts while it lasts.
"""

from __future__ import annotations

import errno
import io
import logging
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deqray.data import DataError, locate
from deqray.data._fs import StorageUnavailable, retrying_iter
from deqray.data.lm import TokenStream, _read_range
from deqray.data.vision import _read_shard

OUTAGE_S = 7.0  # longer than one attempt (pyarrow retries a refused connection for ~6 s)


def parquet(table: pa.Table, row_group_size: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def test_retrying_iter_reopens_and_skips_what_it_yielded():
    """< 1 s: a stream cut after 3 items, and again at its first item, is reopened
    twice; every item comes once, in order; a permanent error is not retried."""
    opened: list[int] = []
    cuts = {1: 3, 2: 0}  # open number -> items it yields before the connection drops

    def source():
        opened.append(len(opened) + 1)
        for i in range(6):
            if i == cuts.get(len(opened), 99):
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            yield i

    assert list(retrying_iter("read", "s3://b/k", source, budget_s=30)) == list(range(6))
    assert opened == [1, 2, 3]

    def denied():
        opened.append(0)
        raise PermissionError(errno.EACCES, "Access denied")
        yield  # pragma: no cover

    opened.clear()
    with pytest.raises(PermissionError):
        list(retrying_iter("read", "s3://b/k", denied, budget_s=30))
    assert opened == [0]

    def down():
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        yield  # pragma: no cover

    with pytest.raises(StorageUnavailable, match=r"s3://b/k: read failed: .*retry budget 1 s"):
        list(retrying_iter("read", "s3://b/k", down, budget_s=1))

    def shrinks():  # a source that comes back shorter than it was: said, not skipped over
        opened.append(1)
        yield from range(3 if len(opened) == 1 else 1)
        if len(opened) == 1:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    opened.clear()
    with pytest.raises(DataError, match="s3://b/k: shorter on a reread"):
        list(retrying_iter("read", "s3://b/k", shrinks, budget_s=30))


def test_shard_reads_ride_out_an_outage(s3_server, s3_bucket, caplog):
    """~15 s: an LM range over two shards, then a vision shard, each read while the
    server is down for 7 s, come back whole once it is up, retried by deqray."""
    tokens = np.arange(1000, dtype=np.int32) % 97
    uris = [f"{s3_bucket}/lm/shard-{i}.parquet" for i in range(2)]
    for uri, part in zip(uris, (tokens[:600], tokens[600:]), strict=True):
        locate(uri).write_bytes(parquet(pa.table({"token": part}), row_group_size=128))
    stream = TokenStream(split="train", uris=tuple(uris), starts=(0, 600), tokens=1000)
    images = pa.table(
        {"index": pa.array(range(50), pa.int64()), "image": [bytes([i]) * 7 for i in range(50)]}
    )
    shard = f"{s3_bucket}/vision/shard-0.parquet"
    locate(shard).write_bytes(parquet(images, row_group_size=16))

    def during_an_outage(read):
        s3_server.down()
        timer = threading.Timer(OUTAGE_S, s3_server.up)
        timer.start()
        try:
            with caplog.at_level(logging.WARNING, logger="deqray.storage"):
                return read()
        finally:
            timer.join()

    caplog.clear()
    got = during_an_outage(lambda: _read_range(stream, 550, 800))
    np.testing.assert_array_equal(got, tokens[550:800])
    assert {uris[0]} == {r.getMessage().split(": read failed")[0] for r in caplog.records}

    caplog.clear()
    blocks = during_an_outage(lambda: list(_read_shard(shard, ["index", "image"], 20)))
    assert [b.num_rows for b in blocks] == [20, 20, 10]
    assert pa.concat_tables(blocks).equals(images)
    assert {shard} == {r.getMessage().split(": read failed")[0] for r in caplog.records}
