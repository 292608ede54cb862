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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
