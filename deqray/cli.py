"""The `deqray` command: parses arguments and calls one function per subcommand."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from deqray.demo import run

    result = run(steps=args.steps, width=args.width, seed=args.seed, threads=args.threads)
    return 0 if result.test_acc > 0 else 1


def _models(args: argparse.Namespace) -> int:
    from deqray.models import describe

    rows = describe()
    width = max(len(r["preset"]) for r in rows)
    print(f"{'preset':<{width}}  {'family':<16} {'parameters':>14}")
    for r in rows:
        print(f"{r['preset']:<{width}}  {r['family']:<16} {r['parameters']:>14,}")
    return 0


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _summary(stats: dict) -> str:
    """Scalars as they are; long mappings and lists (per-class counts, skipped files) by size."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, dict) and len(value) > 8:
            parts.append(f"{key}: {len(value)} entries")
        elif isinstance(value, list) and len(value) > 8:
            parts.append(f"{key}: {len(value)} items")
        else:
            parts.append(f"{key}: {value}")
    return ", ".join(parts)


def _preprocess(args: argparse.Namespace) -> int:
    from deqray.data import DataError, resolve
    from deqray.data._ray import connect

    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"deqray preprocess: --set expects key=value, got {item!r}", file=sys.stderr)
            return 2
        options[key.replace("-", "_")] = _parse_value(value)
    if args.dataset.startswith("wikitext"):
        options.setdefault("name", args.dataset)
    try:
        func = resolve(args.dataset, options)  # bad names fail before Ray starts
        connect()
        manifest = func(args.src, args.out, overwrite=args.overwrite, strict=args.strict, **options)
    except DataError as e:
        print(f"deqray preprocess: {e}", file=sys.stderr)
        return 1
    for name, split in manifest.splits.items():
        print(f"{name}: {split.rows:,} rows in {len(split.shards)} shards; {_summary(split.stats)}")
    print(f"manifest: {manifest.root.rstrip('/')}/manifest.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit a small DEQ on the CPU and print solver statistics")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--width", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.set_defaults(func=_demo)
    models = sub.add_parser("models", help="list the model presets with their parameter counts")
    models.set_defaults(func=_models)
    pre = sub.add_parser("preprocess", help="raw data -> parquet shards + manifest.json (Ray Data)")
    pre.add_argument("dataset", help="wikitext-103, wikitext-2, imagenet, cifar10, digits, markov")
    pre.add_argument("--src", default=None, help="raw data: local path or s3://, gs:// URI")
    pre.add_argument("--out", required=True, help="output directory: local path or URI")
    pre.add_argument("--overwrite", action="store_true", help="redo a finished output")
    pre.add_argument("--strict", action="store_true", help="fail on the first bad record")
    pre.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a data set option, e.g. --set shard_tokens=1048576 or (markov) --set tokens=500000;"
        " an unknown key lists the valid ones",
    )
    pre.set_defaults(func=_preprocess)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
