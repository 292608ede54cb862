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


def _train(args: argparse.Namespace, before_run=None, prog: str = "deqray train") -> int:
    """`before_run(cfg)`, if given, runs after validation and before training
    (pipelines/train.py joins the cluster there)."""
    from deqray.config import ConfigError
    from deqray.train.driver import fit, resolve

    try:
        # validate before Ray starts: a typo costs no cluster start-up
        cfg = resolve(
            args.config,
            args.overrides,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            storage=args.storage,
            name=args.name,
        )
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if before_run is not None:
            before_run(cfg)
        result = fit(cfg, verbose=not args.quiet)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    end = result.return_value or {}
    return 3 if end.get("status") == "diverged" else 0


def _tune(args: argparse.Namespace, before_run=None, prog: str = "deqray tune") -> int:
    """`before_run(study)`, if given, runs after validation and before the study."""
    from deqray.config import ConfigError
    from deqray.tune.study import load_study

    try:
        study = load_study(args.study, args.overrides)  # fails before Ray starts
        if args.print_study:
            for line in study.space_summary():
                print(line)
            return 0
        if before_run is not None:
            before_run(study)
        from deqray.tune.runner import run_study

        result = run_study(
            study,
            storage=args.storage,
            name=args.name,
            resume=args.resume,
            verbose=True,
            optuna_storage=args.optuna_storage,
            show_ray=args.verbose,
        )
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return 0 if result.front else 1


def _budgets(text: str | None) -> list[int] | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            k = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--f-thres: {part!r} is not a whole number") from None
        if k < 1:
            raise argparse.ArgumentTypeError(f"--f-thres: budgets must be >= 1, got {k}")
        out.append(k)
    return out


def _evaluate(args: argparse.Namespace) -> int:
    from deqray.config import ConfigError
    from deqray.evaluate import output
    from deqray.evaluate.split import evaluate_run
    from deqray.evaluate.study import evaluate_study

    try:
        budgets = _budgets(args.f_thres)
        options = dict(
            checkpoint=args.checkpoint,
            batch_size=args.batch_size,
            overrides=args.overrides,
            sradius=args.sradius,
            device=args.device,
        )
        if args.best or args.pareto:
            if budgets:
                raise ConfigError("--f-thres: give a curve for one run, not with --best/--pareto")
            result, evaluations = evaluate_study(
                args.run, pareto=args.pareto, split=args.split, **options
            )
            for ev in evaluations:
                print(output.table(ev))
            print(result.table())
        else:
            ev = evaluate_run(args.run, split=args.split, budgets=budgets, **options)
            evaluations = [ev]
            print(output.table(ev))
    except (ConfigError, argparse.ArgumentTypeError) as e:
        print(f"deqray evaluate: {e}", file=sys.stderr)
        return 2
    if args.out:
        from deqray.data._fs import locate

        out = args.out
        locate(out).write_bytes(
            output.to_json(evaluations[0])
            if len(evaluations) == 1
            else (b"[" + b",".join(output.to_json(e) for e in evaluations) + b"]")
        )
        print(f"results: {out}")
        if len(evaluations) == 1 and len(evaluations[0].points) > 1:
            png = out.rsplit(".", 1)[0] + ".png"
            locate(png).write_bytes(output.plot(evaluations[0]))
            print(f"plot: {png}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from deqray.config import ConfigError
    from deqray.tune.runner import load_results

    try:
        result = load_results(args.experiment)
    except ConfigError as e:
        print(f"deqray compare: {e}", file=sys.stderr)
        return 2
    print(result.table())
    print(f"tensorboard --logdir {result.experiment}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    import json

    if args.kind == "experiment":
        from deqray.config import experiment_schema as make
    else:
        from deqray.tune.study_schema import study_schema as make
    text = json.dumps(make(), indent=2) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from deqray.config import ConfigError
    from deqray.tune.dashboard import serve

    try:
        serve(args.experiment, host=args.host, port=args.port)
    except ConfigError as e:
        print(f"deqray dashboard: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
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
    pre.add_argument(
        "dataset",
        help="wikitext-103, wikitext-2, imagenet, cifar10, cityscapes, digits, markov, shapes",
    )
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
    tr = sub.add_parser(
        "train",
        help="train a DEQ with Ray Train from an experiment config",
        description="Exit status: 0 finished (or stopped at train.stop_at_step), 2 bad config, "
        "3 diverged.",
    )
    tr.add_argument("config", help="a YAML file, or a shipped config: " + _shipped())
    tr.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. deq.f_thres=24"
    )
    tr.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    tr.add_argument("--gpus-per-worker", type=float, default=None)
    tr.add_argument("--storage", default=None, help="runs directory: local path or s3:// URI")
    tr.add_argument(
        "--name", default=None, help="run name; an existing run of that name is resumed"
    )
    tr.add_argument("--quiet", action="store_true", help="no progress lines or summary")
    tr.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    tr.set_defaults(func=_train)
    tu = sub.add_parser(
        "tune",
        help="run a Ray Tune + Optuna study from a search space file",
        description="Exit status: 0 with a best trial or front, 1 when no trial finished, "
        "2 bad study file.",
    )
    tu.add_argument("study", help="a study YAML file, or a name in search_spaces/")
    tu.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. trials=4 or optim.steps=60"
    )
    tu.add_argument("--storage", default=None, help="experiments directory: path or s3:// URI")
    tu.add_argument("--name", default=None, help="experiment name (default: the study's)")
    tu.add_argument("--resume", action="store_true", help="continue an interrupted study")
    tu.add_argument(
        "--optuna-storage",
        default=None,
        metavar="URL",
        help="the trials' database: any Optuna RDB URL, e.g. postgresql+psycopg2://user@host/db"
        " (default: the study's optuna_storage, else SQLite kept with the experiment)",
    )
    tu.add_argument("--print-study", action="store_true", help="print the space and exit")
    tu.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Ray Tune's and the workers' output on the terminal (default: the trial table and "
        "one line per trial event; the rest in <experiment>/ray.log)",
    )
    tu.set_defaults(func=_tune)
    ev = sub.add_parser(
        "evaluate",
        help="a trained run (or a sweep's best trials) on a whole split, at forward budgets",
        description="Exit status: 0 evaluated, 2 bad run, checkpoint, split or option.",
    )
    ev.add_argument("run", help="a run directory or URI, or an experiment with --best/--pareto")
    ev.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="e.g. data.source=... data.eval_tgt_len=128",
    )
    ev.add_argument("--checkpoint", default="latest", help="latest, best or a checkpoint path")
    ev.add_argument("--split", default="test", help="the split to evaluate (default test)")
    ev.add_argument("--f-thres", default=None, help="forward budgets, e.g. 2,4,8,16: the curve")
    ev.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch")
    ev.add_argument("--sradius", action="store_true", help="also the spectral radius of J_f")
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if there)")
    ev.add_argument("--out", default=None, help="JSON results (a PNG plot beside for a curve)")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--best", action="store_true", help="RUN is an experiment: its best trial")
    which.add_argument("--pareto", action="store_true", help="... every trial on its front")
    ev.set_defaults(func=_evaluate)
    dash = sub.add_parser(
        "dashboard", help="serve optuna-dashboard on a study's trials (the dashboard extra)"
    )
    dash.add_argument("experiment", help="a study's experiment directory or URI")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dash.add_argument("--port", type=int, default=8080, help="port to listen on")
    dash.set_defaults(func=_dashboard)
    cmp = sub.add_parser("compare", help="reprint the summary of a finished or running study")
    cmp.add_argument("experiment", help="the experiment directory (printed by deqray tune)")
    cmp.set_defaults(func=_compare)
    sch = sub.add_parser(
        "schema", help="print the JSON Schema of experiment or study files (for YAML editors)"
    )
    sch.add_argument("kind", choices=["experiment", "study"])
    sch.add_argument("--out", default=None, help="write it to this file instead")
    sch.set_defaults(func=_schema)
    return parser


def _shipped() -> str:
    from deqray.config import shipped_configs

    return ", ".join(shipped_configs())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `deqray` (also what pipelines/*.py parse)."""
    parser = build_parser()
    # Overrides may come after options too (`train cfg --workers 2 optim.lr=0.01`):
    # argparse leaves those to parse_known_args.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) in ("train", "tune", "evaluate") and all(
            "=" in x and not x.startswith("-") for x in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


if __name__ == "__main__":
    sys.exit(main())
