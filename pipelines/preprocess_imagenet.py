"""ImageNet class folders -> parquet shards of JPEG bytes + manifest.json, on Ray Data.

Locally (joins a running Ray cluster, or starts one):

    python pipelines/preprocess_imagenet.py --src data/imagenet --out data/imagenet-parquet

where data/imagenet holds train/<wnid>/*.JPEG and val/<wnid>/*. On a cluster,
with sources and outputs every node can read (s3://, gs://, or a shared
mount; a plain local path only works where every node sees it):

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python pipelines/preprocess_imagenet.py --src s3://bucket/imagenet --out s3://bucket/in1k
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder with train/ and val/ (path or URI)")
    parser.add_argument("--out", required=True, help="output directory (path or URI)")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished output")
    parser.add_argument(
        "--strict", action="store_true", help="fail on an undecodable image instead of listing it"
    )
    parser.add_argument("--shard-mb", type=float, default=128.0, help="JPEG bytes per shard")
    parser.add_argument("--splits", default="train,val", help="split folders, training split first")
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the training split")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    from deqray.data import DataError
    from deqray.data._ray import connect
    from deqray.data.images import preprocess_imagenet

    connect()
    try:
        manifest = preprocess_imagenet(
            args.src,
            args.out,
            overwrite=args.overwrite,
            strict=args.strict,
            shard_mb=args.shard_mb,
            splits=args.splits,
            seed=args.seed,
            progress=not args.quiet,
        )
    except DataError as e:
        print(f"preprocess_imagenet: {e}", file=sys.stderr)
        return 1
    for split, info in manifest.splits.items():
        skipped = len(info.stats.get("skipped", []))
        print(f"{split}: {info.rows:,} images, {len(info.shards)} shards, {skipped} skipped")
    print(f"manifest: {manifest.root.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
