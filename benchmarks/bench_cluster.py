"""A real two-node Ray cluster on one machine: trials/hour with one node against two,
and the time from a node failure to the run training again.

    python benchmarks/bench_cluster.py            # ~15 min on 2 cores; results/cluster_cpu.json
    python benchmarks/bench_cluster.py --skip-study   # failover only; keeps the study part

The cluster is the tests' (tests/local_cluster.py): `ray start --block`
process trees, the head pinned to core 0 and the second node to core 1
(`taskset`), 2 logical CPUs each, the head holding TRAIN_DRIVER. Work goes
in through `ray job submit --working-dir .`, as on a real cluster.

1. Trials/hour: `pipelines/tune.py quickstart` (8 trials, ASHA, 2 at a time)
   with each training worker taking 1.5 CPUs, so one trial fits on a node:
   on the head alone (one core) against head + second node (two cores).
   The time is the job's, from submission to its end (Ray's start-up of the
   job, data generation, every trial, the summary).
2. Failover: `pipelines/train.py markov-tiny` placed on the second node (the
   head's CPUs are held while it starts), evaluating and checkpointing every
   10 steps; at step >= 100 the second node's processes are all killed
   (SIGKILL, as a machine failure). Measured from the kill: when Ray marks
   the node dead, when the restored run reports again, and from that report
   the estimated time of its first training step (the report's time minus
   the steps since the restored checkpoint times their mean step time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests.local_cluster import LocalCluster, failover_entrypoint, resumed_steps  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "cluster_cpu.json"
WORKER_CPUS = "scaling.cpus_per_worker=1.5"


def study_on(nodes: int, tmp: Path) -> dict:
    c = LocalCluster()
    try:
        c.start_head(2, {"TRAIN_DRIVER": 64}, cores="0")
        if nodes == 2:
            c.add_node(2, cores="1")
        storage = tmp / f"tune-{nodes}"
        print(f"== quickstart on {nodes} node(s)", flush=True)
        t0 = time.perf_counter()
        job_id, proc = c.submit(
            [
                "python",
                "pipelines/tune.py",
                "quickstart",
                WORKER_CPUS,
                f"data.cache={tmp / f'data-{nodes}'}",
                "--storage",
                str(storage),
                "--name",
                "study",
            ],
            working_dir=str(ROOT),
            timeout=3600,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the study job failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        from deqray.tune.runner import load_results

        res = load_results(str(storage / "study"))
        workers = c.actors("RayTrainWorker")
        per_node: dict[str, int] = {}
        for w in workers:
            per_node[w["node_id"][:8]] = per_node.get(w["node_id"][:8], 0) + 1
        every = res.study.fixed.train.eval_every
        out = {
            "nodes": nodes,
            "wall_s": wall,
            "trials": len(res.rows),
            "trials_per_hour": len(res.rows) / (wall / 3600),
            "train_steps": sum(int(r["reports"]) * every for r in res.rows),
            "statuses": {
                s: sum(r["status"] == s for r in res.rows) for s in {r["status"] for r in res.rows}
            },
            "workers_per_node": per_node,
            "best": res.best() and {k: res.best()[k] for k in ("val_ppl", "val_fwd_nstep")},
        }
        print(
            f"   {wall:.0f} s, {out['trials_per_hour']:.0f} trials/h, "
            f"{out['train_steps']} steps, workers per node {per_node}",
            flush=True,
        )
        return out
    finally:
        c.stop()


def failover(tmp: Path, i: int) -> dict:
    from deqray.train.driver import read_metrics

    c = LocalCluster()
    try:
        c.start_head(2, {"TRAIN_DRIVER": 64}, cores="0")
        node = c.add_node(2, cores="1")
        runs = tmp / f"runs-{i}"
        print(f"== failover {i}", flush=True)
        with c.hold_head_cpus(1):
            job_id, proc = c.submit(
                failover_entrypoint(
                    steps=1200,
                    eval_every=10,
                    eval_batches=2,
                    cache=tmp / "data-failover",
                    storage=runs,
                    worker_cpus=1.5,
                ),
                working_dir=str(ROOT),
                wait=False,
                timeout=120,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stdout + proc.stderr)
            run = runs / "failover"
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                rows = read_metrics(str(run))
                if rows and rows[-1]["step"] >= 100:
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(c.job_logs(job_id)[-4000:])
        killed = c.kill(node)
        dead = None
        while time.time() - killed < 300:
            states = [n.get("state") for n in c.node_table()]
            if "DEAD" in states:
                dead = time.time()
                break
            time.sleep(0.25)
        state = c.wait_job(job_id, timeout=900)
        logs = c.job_logs(job_id)
        if state != "SUCCEEDED":
            raise SystemExit(f"failover job {state}:\n{logs[-4000:]}")
        resumed = resumed_steps(logs)
        # every report as written (a step reported again after the restore
        # keeps both lines): the last one before the kill
        lines = (run / "metrics.jsonl").read_text().splitlines()
        raw = [json.loads(line) for line in lines if line.strip()]
        last_before = max(r["step"] for r in raw if r["time"] <= killed)
        rows = read_metrics(str(run))
        first = next(r for r in rows if r["time"] > killed and r["step"] > resumed[0])
        steps_since = first["step"] - resumed[0]
        training_again = first["time"] - steps_since * first["step_time"] - killed
        out = {
            "last_report_before_kill": last_before,
            "resumed_at_step": resumed[0],
            "steps_redone": last_before - resumed[0],
            "node_dead_after_s": None if dead is None else dead - killed,
            "first_report_after_s": first["time"] - killed,
            "training_again_after_s": training_again,
            "step_time_s": first["step_time"],
        }
        print(
            "   "
            + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}),
            flush=True,
        )
        return out
    finally:
        c.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="failover runs")
    ap.add_argument("--skip-study", action="store_true", help="only the failover part")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    from bench_train import machine_info

    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    results: dict = {"machine": machine_info()}
    if not args.skip_study:
        one, two = study_on(1, tmp), study_on(2, tmp)
        results["study"] = {
            "one_node": one,
            "two_nodes": two,
            "trials_per_hour_ratio": two["trials_per_hour"] / one["trials_per_hour"],
        }
    results["failover"] = [failover(tmp, i) for i in range(args.repeats)]
    if args.skip_study and Path(args.out).exists():
        # keep the study part of an earlier run; say when each part ran
        earlier = json.loads(Path(args.out).read_text())
        if "study" in earlier:
            results = {
                **earlier,
                "failover": results["failover"],
                "failover_machine": results["machine"],
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
