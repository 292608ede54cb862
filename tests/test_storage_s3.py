"""Data sets on s3://, over the real S3 protocol: `deqray preprocess` writes, the readers read.

The server is moto's on 127.0.0.1 (tests/s3_server.py). deqray reaches it
only through the settings a user sets (AWS_ENDPOINT_URL, keys, region in
the environment) and pyarrow's S3 filesystem: nothing in deqray is patched.
Every output is compared with the same command's output on a local disk.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from deqray.cli import main as deqray
from deqray.data import load_manifest, locate
from deqray.data.digits import write_digits
from deqray.data.images import preprocess_cifar10
from deqray.data.lm import iter_lm_batches, lm_ingest, summarize_lm_batches
from deqray.data.markov import write_markov_corpus
from deqray.data.vision import vision_datasets
from deqray.data.wikitext import load_vocab

MARKOV = {"tokens": 6000, "vocab_size": 40, "branching": 6, "seed": 3, "shard_tokens": 500}


def as_set_args(options: dict) -> list[str]:
    return [arg for k, v in options.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture
def s3_ray(ray_session, s3_server):
    """Ray whose workers see the S3 settings (they inherit them when Ray starts)."""
    import ray

    @ray.remote(num_cpus=0)
    def endpoint():
        import os

        return os.environ.get("AWS_ENDPOINT_URL")

    seen = ray.get(endpoint.remote())
    if seen != s3_server.endpoint:
        pytest.fail(f"Ray's workers have AWS_ENDPOINT_URL={seen!r}: Ray started before s3_server")
    return ray_session


def same_files(remote, local) -> None:
    """Two manifests of one data set: the same shards, byte for byte, and the same facts."""
    assert remote.splits == local.splits  # paths, rows, bytes, sha256, stats
    assert remote.meta == local.meta and remote.dataset == local.dataset


def test_the_file_layer_reaches_the_server_through_the_standard_settings(s3_server, s3_bucket):
    loc = locate(f"{s3_bucket}/a/b.txt")
    assert isinstance(loc.fs, pafs.S3FileSystem)
    loc.write_bytes(b"over the wire")
    got = s3_server.backend().get_object(Bucket=s3_bucket[5:], Key="a/b.txt")["Body"].read()
    assert got == b"over the wire" and loc.read_bytes() == got
    assert loc.is_file() and locate(f"{s3_bucket}/a").is_dir() and loc.size() == len(got)
    # the temporary name of the atomic write is gone
    assert [k for k in s3_server.keys(s3_bucket) if not k.endswith("/")] == ["a/b.txt"]


def test_preprocess_markov_to_s3_reads_back_equal_to_local(s3_ray, s3_server, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/markov"
    assert deqray(["preprocess", "markov", "--out", uri, *as_set_args(MARKOV)]) == 0
    local = write_markov_corpus(None, str(tmp_path / "markov"), progress=False, **MARKOV)
    remote = load_manifest(uri, verify="checksum")
    assert remote.root == uri and len(remote.splits["train"].shards) > 5
    same_files(remote, local)
    assert load_vocab(uri) == load_vocab(local.root)
    listed = {f"markov/{s.path}" for split in remote.splits.values() for s in split.shards}
    files = [k for k in s3_server.keys(uri) if not k.endswith("/")]
    assert sorted(files) == sorted(listed | {"markov/manifest.json", "markov/vocab.txt"})

    # the reader for Ray Train: the same lanes, token for token
    def lanes(root):
        datasets, _ = lm_ingest(root, batch_size={"train": 3, "valid": 2})
        return {
            split: summarize_lm_batches(iter_lm_batches(ds, 32), keep_tokens=True)
            for split, ds in datasets.items()
        }

    got, want = lanes(uri), lanes(local.root)
    assert got == want and got["train"]["continuous"] and got["train"]["batches"] > 10


def write_cifar_batches(put, n_per_file: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches in the original pickle format, through `put(name, bytes)`."""
    rng = np.random.default_rng(seed)
    names = ["truck", "cat", "airplane"]
    put("batches.meta", pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(n_per_file, 32, 32, 3), dtype=np.uint8)
        batch = {
            b"labels": rng.integers(0, len(names), size=n_per_file).tolist(),
            b"data": images.transpose(0, 3, 1, 2).reshape(n_per_file, 3072),
        }
        put(name, pickle.dumps(batch, protocol=2))
        arrays[name] = images
    return arrays


def eval_rows(root: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, image) of a split through the vision reader, in index order."""
    ds = vision_datasets(root, splits=[split], size=None, with_index=True, shuffle=False)[split]
    rows = ds.take_all()
    order = np.argsort([r["index"] for r in rows])
    pick = [rows[i] for i in order]
    return (
        np.array([r["index"] for r in pick]),
        np.array([r["label"] for r in pick]),
        np.stack([r["image"] for r in pick]),
    )


def test_preprocess_images_to_s3_read_back_equal_to_local(s3_ray, s3_server, s3_bucket, tmp_path):
    # digits: written by the driver itself
    uri = f"{s3_bucket}/digits"
    assert deqray(["preprocess", "digits", "--out", uri, "--set", "shard_mb=0.05"]) == 0
    remote = load_manifest(uri, verify="checksum")
    local = write_digits(None, str(tmp_path / "digits"), shard_mb=0.05, progress=False)
    same_files(remote, local)  # the same bytes: the reader is compared on CIFAR below
    assert len(remote.splits["train"].shards) > 1

    # CIFAR-10: the source on S3 too, read and written by Ray tasks
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.backend()
    write_cifar_batches(lambda n, b: client.put_object(Bucket=bucket, Key=f"raw/{n}", Body=b))
    (tmp_path / "raw").mkdir()
    arrays = write_cifar_batches(lambda n, b: (tmp_path / "raw" / n).write_bytes(b))
    uri = f"{s3_bucket}/cifar10"
    argv = ["preprocess", "cifar10", "--src", f"{s3_bucket}/raw", "--out", uri]
    assert deqray([*argv, "--set", f"shard_mb={2 * 3072 / 2**20}"]) == 0
    remote = load_manifest(uri, verify="checksum")
    local = preprocess_cifar10(
        str(tmp_path / "raw"), str(tmp_path / "cifar10"), shard_mb=2 * 3072 / 2**20, progress=False
    )
    assert remote.source == f"{s3_bucket}/raw" and remote.splits["train"].rows == 15
    assert remote.splits == local.splits and remote.meta == local.meta
    index, labels, images = eval_rows(uri, "test")
    for a, b in zip((index, labels, images), eval_rows(local.root, "test"), strict=True):
        np.testing.assert_array_equal(a, b)
    # and the stored PNGs are the source pixels
    table = pq.read_table(remote.shard_uris("test")[0])
    from PIL import Image

    with Image.open(io.BytesIO(table.column("image")[0].as_py())) as img:
        np.testing.assert_array_equal(np.asarray(img), arrays["test_batch"][0])
