"""The contract every task meets, shipped or not: one suite, parametrized over the tasks.

For each task (the shipped ones and the example in examples/, which deqray
does not ship) a short Ray Train run of one worker (two for segmentation and
the language model: tests/shared_runs.py), with the Jacobian loss and the
spectral radius on so that every metric the platform declares is reported,
and the same run with a worker killed mid-way:

* the training loss falls;
* every metric the task declares (and every one of the platform's) is in
  the report and in TensorBoard, and the report holds nothing undeclared;
* the killed run resumes from its checkpoint on the same trajectory.

The tasks and their settings are in tests/shared_runs.py: the runs are read
by other test files too (the language model's are tests/test_train.py's).
Cost: two runs per task, of about 25 s each on 2 cores, nearly all of it the
fit's fixed start-up.
"""

from __future__ import annotations

import math
import os

import pytest

from deqray.train.driver import read_metrics, resolve
from deqray.train.report import report_metrics, task_metrics
from deqray.train.tensorboard import tag_for
from tests import shared_runs
from tests.shared_runs import LANGUAGE_MODEL, TASKS


@pytest.fixture(scope="module", params=list(TASKS))
def runs(request, ray_session, tmp_path_factory):
    # the language model's run tracks to the session's MLflow server
    uri = request.getfixturevalue("session_mlflow_uri") if request.param == LANGUAGE_MODEL else None
    whole = shared_runs.contract_run(request.param, tmp_path_factory, uri)
    killed = shared_runs.interrupted_run(request.param, tmp_path_factory, uri)
    return resolve(whole.config, whole.overrides), whole.result, killed


def evaluated_steps(cfg) -> list[int]:
    return list(range(cfg.train.eval_every, cfg.optim.steps + 1, cfg.train.eval_every))


def test_the_run_finishes_and_its_loss_falls(runs):
    cfg, whole, _ = runs
    assert whole.error is None and whole.return_value["status"] == "finished"
    rows = read_metrics(whole.path)
    steps = evaluated_steps(cfg)
    assert len(steps) == 4 and [r["step"] for r in rows] == steps
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    primary = task_metrics(cfg)[0]
    first, last = rows[0][primary.name], rows[-1][primary.name]
    assert math.isfinite(first) and math.isfinite(last)


def test_every_declared_metric_is_reported_and_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, whole, _ = runs
    declared = report_metrics(cfg)
    last = read_metrics(whole.path)[-1]
    numeric = {k for k, v in last.items() if isinstance(v, (int, float))}
    assert numeric - set(declared) == set(), "reported but not declared"
    assert set(declared) - numeric == set(), "declared but not reported"
    acc = EventAccumulator(os.path.join(whole.path, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for m in task_metrics(cfg):
        assert tag_for(m.name) in tags, m.name
        assert [e.step for e in acc.Scalars(tag_for(m.name))] == evaluated_steps(cfg)


def test_a_killed_worker_resumes_on_the_same_trajectory(runs):
    cfg, whole, killed = runs
    result = killed.run.result
    assert result.return_value["status"] == "finished" and result.path != whole.path
    assert os.listdir(os.path.join(result.path, "_faults")) == [f"step-{killed.fault_step}"]
    a, b = read_metrics(whole.path), read_metrics(result.path)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", task_metrics(cfg)[0].name, "val_fwd_nstep"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-7), (ra["step"], key)
