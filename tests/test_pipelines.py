"""pipelines/train.py and tune.py without a cluster: arguments, validation before Ray, warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_train_pipeline_takes_the_train_command_line():
    out = _run("train.py", "markov-tiny", "optim.lr=0.01", "--workers", "2", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.01" in out.stdout and "workers: 2" in out.stdout
    assert "Ray cluster" not in out.stdout  # printing the config joins no cluster


def test_tune_pipeline_takes_the_tune_command_line():
    out = _run("tune.py", "quickstart", "trials=3", "--print-study")
    assert out.returncode == 0, out.stderr
    assert "optim.lr" in out.stdout and "deq.f_thres" in out.stdout


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["markov-tiny", "optim.lrr=0.1"], "optim.lrr"),
        ("train.py", ["no-such-config"], "no-such-config"),
        ("tune.py", ["quickstart", "trials=-1"], "trials"),
        ("tune.py", ["quickstar"], "did you mean 'quickstart'"),
    ],
)
def test_bad_arguments_fail_before_ray_starts(script, args, message):
    out = _run(script, *args)
    assert out.returncode == 2
    assert f"pipelines/{script}:" in out.stderr and message in out.stderr
    assert "Ray cluster" not in out.stdout and "Started a local Ray" not in out.stderr


def test_storage_warning_for_node_local_paths_on_a_multi_node_cluster(monkeypatch):
    import ray

    from deqray.data._ray import storage_warning

    alive = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: alive)
    warning = storage_warning("/data/runs")
    assert warning and "/data/runs" in warning and "2 nodes" in warning
    assert storage_warning("file:///data/runs") is not None
    assert storage_warning("s3://bucket/runs") is None
    monkeypatch.setattr(ray, "nodes", lambda: alive[:1])
    assert storage_warning("/data/runs") is None  # one node sees its own disk
