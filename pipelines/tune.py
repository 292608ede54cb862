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
    from deqray.cli import _tune, parse_args

    args = parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])

    def join_cluster(study) -> None:
        from deqray.data._ray import cluster_summary, connect, storage_warning
        from deqray.tasks.registry import runtime_env_for
        from deqray.tune.runner import LOCAL_RESOURCES, experiment_uri

        root, _ = experiment_uri(study, args.storage, args.name, args.resume)
        # the resources only where Ray starts here; a user task's package travels with the job
        env = runtime_env_for(study.fixed.task) or None
        connect(resources=LOCAL_RESOURCES, runtime_env=env)
        print(cluster_summary(), flush=True)
        warning = storage_warning(root)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    # a bad study fails (exit 2) before the cluster is joined
    return _tune(args, before_run=join_cluster, prog="pipelines/tune.py")


if __name__ == "__main__":
    sys.exit(main())
