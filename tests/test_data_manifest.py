"""Manifests, atomic outputs and damage detection, on the local filesystem."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from deqray.data import DataError, Manifest, Split, load_manifest, locate, prepare_output
from deqray.data.manifest import MANIFEST, write_manifest, write_shard


def make(out, rows=(5, 3)):
    loc, existing = prepare_output(out)
    assert existing is None
    shards = [
        write_shard(loc, f"train/shard-{i:05d}.parquet", pa.table({"x": list(range(n))}))
        for i, n in enumerate(rows)
    ]
    m = Manifest(dataset="toy", kind="lm", splits={"train": Split(rows=sum(rows), shards=shards)})
    write_manifest(loc, m)
    return loc


def test_round_trip_and_reuse(tmp_path):
    make(tmp_path / "out")
    m = load_manifest(tmp_path / "out", verify="checksum")
    assert m.splits["train"].rows == 8 and len(m.shard_uris("train")) == 2
    assert m.shard_uris("train")[0].endswith("train/shard-00000.parquet")
    _, reused = prepare_output(tmp_path / "out")
    assert reused is not None and reused.splits == m.splits
    with pytest.raises(DataError, match="no split 'valid'; splits: train"):
        m.shard_uris("valid")


def test_truncated_and_altered_shards_are_named(tmp_path):
    loc = make(tmp_path / "out")
    shard = tmp_path / "out" / "train" / "shard-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"shard-00001.parquet: \d+ bytes, the manifest says"):
        load_manifest(loc)
    with pytest.raises(DataError, match="damaged; pass --overwrite"):
        prepare_output(tmp_path / "out")
    # same size, different content: only the checksum notices
    mid = 8  # inside the first data page, away from the footer
    shard.write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :])
    load_manifest(loc, verify="size")
    with pytest.raises(DataError, match="checksum does not match"):
        load_manifest(loc, verify="checksum")


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    loc, _ = prepare_output(out)
    write_shard(loc, "train/shard-00000.parquet", pa.table({"x": [1]}))
    (out / "train" / ".tmp-abc-shard-00001.parquet").write_bytes(b"partial")
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(out)
    loc, existing = prepare_output(out)  # a re-run cleans the leftovers
    assert existing is None and list(out.iterdir()) == []


def test_foreign_directory_is_not_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"not a deqray data set \(found notes.txt\)"):
        prepare_output(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_and_bad_manifest(tmp_path):
    make(tmp_path / "out")
    loc, existing = prepare_output(tmp_path / "out", overwrite=True)
    assert existing is None and not (tmp_path / "out" / MANIFEST).exists()
    (tmp_path / "out" / MANIFEST).write_text(json.dumps({"dataset": 1}))
    with pytest.raises(DataError, match="not a valid deqray manifest"):
        load_manifest(tmp_path / "out", verify="none")


def test_locations_accept_uris(tmp_path):
    loc = locate(f"file://{tmp_path}")
    loc.join("a", "b.bin").write_bytes(b"123")
    assert loc.join("a").list() == ["b.bin"] and loc.join("a", "b.bin").size() == 3
