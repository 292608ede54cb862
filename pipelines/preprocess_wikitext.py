"""Raw WikiText (or the generated Markov corpus) -> parquet shards + manifest.json, on Ray Data.

Locally (joins a running Ray cluster, or starts one):

    python pipelines/preprocess_wikitext.py --src data/wikitext-103 --out data/wt103

On a cluster, with sources and outputs every node can read (s3://, gs://,
or file:// on a shared mount; plain local paths keep the work on the
driver's node):

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python pipelines/preprocess_wikitext.py --src s3://bucket/wikitext-103 --out s3://bucket/wt103
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--name",
        default="wikitext-103",
        choices=["wikitext-103", "wikitext-2", "markov"],
        help="data set (markov: generated; --src is then where its text is kept, optional)",
    )
    parser.add_argument("--src", default=None, help="directory of wiki.{train,valid,test}.tokens")
    parser.add_argument("--out", required=True, help="output directory (path or URI)")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished output")
    parser.add_argument("--chunk-mb", type=float, default=16.0, help="raw text per Ray Data task")
    parser.add_argument("--shard-tokens", type=int, default=1 << 22, help="most tokens per shard")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    from deqray.data import DataError, preprocess
    from deqray.data._ray import connect

    connect()
    try:
        manifest = preprocess(
            args.name,
            args.src,
            args.out,
            overwrite=args.overwrite,
            chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
            shard_tokens=args.shard_tokens,
            progress=not args.quiet,
        )
    except DataError as e:
        print(f"preprocess_wikitext: {e}", file=sys.stderr)
        return 1
    for split, info in sorted(manifest.splits.items()):
        print(f"{split}: {info.stats}")
    print(f"manifest: {manifest.root.rstrip('/')}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
