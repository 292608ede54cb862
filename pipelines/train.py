"""Train one experiment on the Ray cluster this runs on (a local Ray otherwise): `deqray train`.

Same arguments as `deqray train CONFIG [key=value ...] [--workers N]
[--gpus-per-worker G] [--storage PATH] [--name N]`. Locally:

    python pipelines/train.py markov-tiny --workers 2

On a cluster made with cluster.yaml (storage every node can reach: s3://,
gs://, or a shared mount; a run given an existing --name resumes it):

    ray submit cluster.yaml pipelines/train.py -- wt103-deq-jac \\
        data.source=s3://YOUR-BUCKET/deqray/data/wt103 --workers 8 --gpus-per-worker 1 \\
        --storage s3://YOUR-BUCKET/deqray/runs
    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python pipelines/train.py wt103-deq-jac ... --storage s3://YOUR-BUCKET/deqray/runs

It prints the cluster it joined, a live progress line, and at the end the
run's directory (checkpoints, metrics.jsonl) and its TensorBoard command.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from deqray.cli import _train, parse_args

    args = parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    # a bad config fails (exit 2) before the cluster is joined
    return _train(args, before_run=_join_cluster, prog="pipelines/train.py")


def _join_cluster(cfg) -> None:
    from deqray.data._ray import cluster_summary, connect, storage_warning
    from deqray.tasks.registry import runtime_env_for
    from deqray.train.driver import storage_uri

    # address="auto" where a cluster runs (a submitted job), local otherwise; a user
    # task's package travels with the job (py_modules)
    connect(runtime_env=runtime_env_for(cfg.task) or None)
    print(cluster_summary(), flush=True)
    warning = storage_warning(storage_uri(cfg))
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
