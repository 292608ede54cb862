"""The task deqray does not ship (examples/deblur), through the CLI as a user runs it.

`deqray train examples/deblur/experiment.yaml` and `deqray tune
examples/deblur/study.yaml` from the project root, each in a subprocess that
joins the session's Ray as a user's command joins a running cluster
(conftest's `ray_address`; the task's package travels to the workers in the
job's runtime environment). The README's example starts a local Ray of its
own, as on a laptop. A run stopped and resumed by `deqray train` is held to
the uninterrupted run of the same settings that the task contract trains on
the session's Ray (tests/shared_runs.py). Cost: three short training runs in
subprocesses and a 2-trial study, about 3 minutes beside other tests.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqray.train.driver import read_metrics
from deqray.tune.runner import load_results
from tests import shared_runs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "examples/deblur/experiment.yaml"
TASK = "deblur (examples/)"  # its name in tests/shared_runs.TASKS
SMALL = [
    "optim.steps=8",
    "optim.batch_size=16",
    "optim.lr=0.01",
    "train.pretrain_steps=2",
    "train.eval_every=4",
    "data.train_size=256",
    "data.eval_size=64",
    "deq.f_thres=12",
    "deq.b_thres=12",
]


# Off: the preemption watcher (an actor process per worker group) and Ray
# Train's metrics, which no test reads.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def deqray(*args, address: str, timeout=600) -> str:
    """`deqray ARGS` from the project root, on the Ray at `address`."""
    env = dict(os.environ, **RAY_ENV, RAY_ADDRESS=address)
    env.pop("PYTHONPATH", None)  # the task must come from the project root alone
    proc = subprocess.run(
        [sys.executable, "-m", "deqray.cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_deqray_train_runs_the_example_task_and_resumes_it_exactly(
    ray_address, tmp_path_factory, tmp_path
):
    # The uninterrupted run is the example task's run of the task contract,
    # trained in this process (tests/shared_runs.py); these two, each a
    # `deqray train` of its own, must follow it exactly.
    whole = shared_runs.contract_run(TASK, tmp_path_factory)
    settings = [EXPERIMENT, *whole.overrides, "--storage", tmp_path, "--name", "r"]

    # stopped at step 8, then the same name resumes it to the end
    out = deqray("train", *settings, "train.stop_at_step=8", address=ray_address)
    assert "(deblur)" in out and "stopped at step 8" in out
    out = deqray("train", *settings, address=ray_address)
    assert "resuming run r" in out and "finished at step 16" in out and "val mse" in out
    resumed = read_metrics(str(tmp_path / "r"))
    assert [r["step"] for r in resumed] == [4, 8, 12, 16]
    assert resumed[-1]["train_loss"] < resumed[0]["train_loss"]
    assert resumed[-1]["val_psnr"] > resumed[0]["val_psnr"]
    for a, b in zip(read_metrics(whole.path), resumed, strict=True):
        for key in ("train_loss", "val_mse"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-8), (a["step"], key)


def test_deqray_tune_sweeps_the_example_task_on_its_own_metrics(ray_address, tmp_path):
    out = deqray(
        "tune",
        "examples/deblur/study.yaml",
        "trials=2",
        *(x for x in SMALL if not x.startswith(("optim.lr", "deq.f_thres"))),  # searched
        "--storage",
        tmp_path,
        "--name",
        "deblur",
        address=ray_address,
        timeout=900,
    )
    assert "Pareto front of 2 trials" in out
    result = load_results(str(tmp_path / "deblur"))
    assert result.study.metric_names() == ["val_mse", "val_fwd_nstep"]
    assert len(result.rows) == 2 and {r["status"] for r in result.rows} == {"finished"}
    for row in result.rows:
        assert 0 < row["val_mse"] < 0.1 and row["val_fwd_nstep"] > 0
    assert result.front


@pytest.mark.parametrize(
    "task, message",
    [
        ("examples.deblur.nope:DeblurTask", "cannot import 'examples.deblur.nope'"),
        ("examples.deblur.task:DeblurTusk", "has no 'DeblurTusk' (did you mean 'DeblurTask'?)"),
        ("examples.deblur.task:DeblurData", "is not a deqray.tasks.Task subclass"),
    ],
)
def test_a_bad_task_path_is_named_before_ray_starts(tmp_path, task, message):
    proc = subprocess.run(
        [sys.executable, "-m", "deqray.cli", "train", EXPERIMENT, f"task={task}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "task" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_the_readme_task_example_trains_from_its_project_root(tmp_path):
    """The README's complete short example, as a user would save it: mypkg/tasks.py and an
    experiment file naming it, trained by `deqray train` run in that directory."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n# mypkg/tasks.py\n") + len("```python\n")
    code = readme[start : readme.index("```\n", start)]
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "tasks.py").write_text(code)
    (tmp_path / "exp.yaml").write_text(
        "task: mypkg.tasks:Regression\nmodel: {width: 16}\ndeq: {f_thres: 12, b_thres: 12}\n"
        "optim: {steps: 16, batch_size: 32, lr: 0.01}\ntrain: {eval_every: 8}\n"
    )
    env = dict(os.environ, **RAY_ENV, RAY_ADDRESS="local")  # a laptop: no Ray running
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deqray.cli",
            "train",
            "exp.yaml",
            "--storage",
            "runs",
            "--name",
            "r",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = read_metrics(str(tmp_path / "runs" / "r"))
    assert [r["step"] for r in rows] == [8, 16]
    assert rows[-1]["val_mse"] < rows[0]["val_mse"] and rows[-1]["val_samples"] == 256
