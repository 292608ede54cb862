"""Run a sweep on the Ray cluster this runs on (a local Ray otherwise): `deqray tune`.

Same arguments as `deqray tune STUDY [key=value ...] [--storage PATH]
[--name N] [--resume]`; STUDY is a file or the name of one in
search_spaces/. Locally:

    python pipelines/tune.py quickstart

On a cluster made with cluster.yaml (the experiment directory on storage
every node can reach: s3://, gs://, or a shared mount):

    ray submit cluster.yaml pipelines/tune.py -- deq_wt103 --storage s3://YOUR-BUCKET/deqray/tune
    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python pipelines/tune.py search_spaces/deq_wt103.yaml --storage s3://YOUR-BUCKET/deqray/tune

An interrupted study continues with the same --name and --resume. It prints
the cluster it joined, Tune's live trial table, and at the end the Pareto
front (or best trial), the result files, the Optuna storage and the
TensorBoard command.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from deqray.cli import parse_args
    from deqray.config import ConfigError
    from deqray.data._ray import cluster_summary, connect, storage_warning
    from deqray.tune.runner import LOCAL_RESOURCES, experiment_uri
    from deqray.tune.study import load_study

    args = parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    try:  # a bad study fails before joining the cluster
        study = load_study(args.study, args.overrides)
        root, _ = experiment_uri(study, args.storage, args.name, args.resume)
    except ConfigError as e:
        print(f"pipelines/tune.py: {e}", file=sys.stderr)
        return 2
    if not args.print_study:
        connect(resources=LOCAL_RESOURCES)  # the resources only where Ray starts here
        print(cluster_summary(), flush=True)
        warning = storage_warning(root)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
