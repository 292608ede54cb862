"""CIFAR-10 python batches -> parquet shards of PNG bytes + manifest.json, on Ray Data.

Locally (joins a running Ray cluster, or starts one):

    python pipelines/preprocess_cifar10.py --src data/cifar-10-batches-py --out data/cifar10

where the source folder holds data_batch_1..5, test_batch and batches.meta
(the "CIFAR-10 python version" archive, extracted). On a cluster, with paths
every node can read:

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python pipelines/preprocess_cifar10.py --src s3://bucket/cifar-10-batches-py \\
        --out s3://bucket/cifar10
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="the cifar-10-batches-py folder (path or URI)")
    parser.add_argument("--out", required=True, help="output directory (path or URI)")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished output")
    parser.add_argument(
        "--shard-mb", type=float, default=8.0, help="raw pixel bytes per shard (3,072 an image)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    from deqray.data import DataError
    from deqray.data._ray import connect
    from deqray.data.images import preprocess_cifar10

    connect()
    try:
        manifest = preprocess_cifar10(
            args.src,
            args.out,
            overwrite=args.overwrite,
            shard_mb=args.shard_mb,
            progress=not args.quiet,
        )
    except DataError as e:
        print(f"preprocess_cifar10: {e}", file=sys.stderr)
        return 1
    for split, info in manifest.splits.items():
        print(f"{split}: {info.rows:,} images, {len(info.shards)} shards")
    print(f"manifest: {manifest.root.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
