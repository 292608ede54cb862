"""The scale-out path on a real two-node Ray cluster: `ray start` processes on this machine.

The head (2 logical CPUs, the trial drivers' TRAIN_DRIVER resource) and a
second node (2 logical CPUs) are separate `ray start` process trees, pinned
to separate cores where the machine has two. Work reaches them the way it
reaches a real cluster: `ray job submit --working-dir DIR` running
pipelines/tune.py from the project, and pipelines/train.py from a user's own
project whose task deqray does not ship. A training worker takes 1.5 CPUs,
so one fits on a node and concurrent trials must spread over both.

Cost on the 2-core machine (2026-12-03, other Ray tests running beside them):
the study 100-150 s, the user task's run with its node failure 90-120 s (some
40 s of it the restart on the head: the new worker's start on one core, not
the 50 steps left), the cluster's start and stop about 15 s; 3.5-5 min in
all. Nearly all of it is Ray starting processes (job and trial drivers,
training workers), not training.

Marked `cluster`: `pytest -m "not cluster"` skips them; CI runs them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from deqray.train.driver import read_metrics
from tests.local_cluster import LocalCluster, failover_entrypoint, resumed_steps

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
WORKER_CPUS = "scaling.cpus_per_worker=1.5"
FAILOVER_STEPS = 150
TWO_CORES = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) >= 2


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head(2, {"TRAIN_DRIVER": 64}, cores="0" if TWO_CORES else None)
        yield c
    finally:
        c.stop()
        assert c.leftovers() == []


def _node_ids(c: LocalCluster) -> dict[str, str]:
    """{node_id: "head" | "worker"} of the nodes alive now."""
    out = {}
    for n in c.node_table():
        if n.get("state") == "ALIVE":
            out[n["node_id"]] = "head" if n.get("is_head_node") else "worker"
    return out


def _fail(c: LocalCluster, job_id: str, state: str) -> str:
    logs = c.job_logs(job_id)
    return f"job {job_id} ended {state}; last lines:\n{logs[-6000:]}"


def test_quickstart_study_runs_on_both_nodes(cluster, tmp_path):
    node = cluster.add_node(2, cores="1" if TWO_CORES else None)
    try:
        nodes = _node_ids(cluster)
        assert sorted(nodes.values()) == ["head", "worker"]
        storage = tmp_path / "tune"
        job_id, proc = cluster.submit(
            [
                "python",
                "pipelines/tune.py",
                "quickstart",
                # two trials at once: one worker (1.5 CPUs) fits on a node,
                # so the second trial's worker must go to the other node
                "trials=2",
                "optim.steps=50",
                "train.pretrain_steps=25",
                "train.eval_every=25",
                "train.eval_batches=4",
                "scheduler.grace_period=2",
                WORKER_CPUS,
                f"data.cache={tmp_path / 'data'}",
                "--storage",
                str(storage),
                "--name",
                "two-nodes",
            ],
            working_dir=str(ROOT),
            timeout=900,
        )
        logs = proc.stdout + proc.stderr
        assert proc.returncode == 0, logs[-6000:]
        assert cluster.job_status(job_id) == "SUCCEEDED"
        assert "2 nodes, 4 CPUs" in logs  # the pipeline says where it runs
        assert f"tensorboard --logdir {storage / 'two-nodes'}" in logs

        from deqray.tune.runner import load_results

        result = load_results(str(storage / "two-nodes"))
        assert len(result.rows) == 2
        assert {r["status"] for r in result.rows} <= {"finished", "stopped early"}
        assert result.front
        # the trials' training workers ran on both nodes
        workers = cluster.actors("RayTrainWorker")
        assert len(workers) >= 2
        used = {w["node_id"] for w in workers}
        assert used == set(nodes), (used, nodes)
    finally:
        cluster.kill(node)
        cluster.wait_for_nodes(1, timeout=120)


def _user_project(root: Path) -> Path:
    """A user's project as `ray job submit --working-dir` sends it: the example task
    copied under a package name that exists nowhere else, its experiment file naming
    it, and the training pipeline."""
    import shutil

    (root / "userpkg").mkdir(parents=True)
    (root / "pipelines").mkdir()
    shutil.copy(ROOT / "examples/deblur/task.py", root / "userpkg" / "deblur_task.py")
    shutil.copy(ROOT / "pipelines/train.py", root / "pipelines" / "train.py")
    text = (ROOT / "examples/deblur/experiment.yaml").read_text()
    text = text.replace("examples.deblur.task:DeblurTask", "userpkg.deblur_task:DeblurTask")
    (root / "experiment.yaml").write_text(text)
    return root


def test_a_user_task_on_the_second_node_survives_its_node_and_resumes_on_the_head(
    cluster, tmp_path
):
    """The user's task reaches a training worker on the second node through the job's
    working_dir alone; that node dies mid-run, and the run resumes from its last
    checkpoint on the head."""
    project = _user_project(tmp_path / "project")
    node = cluster.add_node(2, cores="1" if TWO_CORES else None)
    nodes = _node_ids(cluster)
    before_job = {w["actor_id"] for w in cluster.actors("RayTrainWorker")}
    # One of the head's two CPUs is held while the run starts, so its worker
    # (1.5 CPUs) goes to the second node, while the driver's data preparation
    # still runs on the head; the CPU is freed before that node is killed. The
    # node is frozen (SIGSTOP) as soon as step 100's report is seen (checkpoints
    # every 50), so that it dies mid-run however fast it trains, then killed:
    # the run resumes from step 50 or 100 on the head and trains to the end.
    with cluster.hold_head_cpus(1):
        runs = tmp_path / "runs"
        job_id, proc = cluster.submit(
            failover_entrypoint(
                config="experiment.yaml",
                steps=FAILOVER_STEPS,
                eval_every=50,
                eval_batches=4,
                storage=runs,
                worker_cpus=1.5,
            ),
            working_dir=str(project),
            wait=False,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = runs / "failover"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = read_metrics(str(run))
            if rows and rows[-1]["step"] >= 100:
                frozen_at = cluster.freeze(node)
                break
            state = cluster.job_status(job_id)
            assert state in ("PENDING", "RUNNING"), _fail(cluster, job_id, state)
            time.sleep(0.25)
        else:
            pytest.fail(_fail(cluster, job_id, "still short of step 100"))
        # the job's worker is on the second node
        workers = [w for w in cluster.actors("RayTrainWorker") if w["actor_id"] not in before_job]
        assert [nodes[w["node_id"]] for w in workers if w["state"] == "ALIVE"] == ["worker"]
        before = rows[-1]["step"]
    cluster.kill(node)

    state = cluster.wait_job(job_id, timeout=600)
    logs = cluster.job_logs(job_id)
    assert state == "SUCCEEDED", _fail(cluster, job_id, state)
    assert "(deblur)" in logs and "2 nodes, 4 CPUs" in logs
    assert f"tensorboard --logdir {run}/tensorboard" in logs
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == FAILOVER_STEPS
    # restored from a checkpoint at or after the last report seen before the kill
    resumed = resumed_steps(logs)
    assert resumed and before - 50 <= resumed[0] < FAILOVER_STEPS, (resumed, before)
    rows = read_metrics(str(run))
    after = [r for r in rows if r["time"] > frozen_at]
    assert after and after[0]["step"] > resumed[0], (
        frozen_at,
        [(r["step"], r["time"]) for r in rows],
        resumed,
    )
    steps = [r["step"] for r in after]
    assert steps == sorted(steps) and steps[-1] == FAILOVER_STEPS
    assert rows[-1]["val_mse"] < rows[0]["val_mse"]  # the task's own metric, from its module
    # the restored worker runs on the head, the only node left
    workers = cluster.actors("RayTrainWorker")
    head = next(n for n, kind in nodes.items() if kind == "head")
    assert any(w["node_id"] == head for w in workers)
    assert cluster.alive() == 1
