"""The contract every task meets, shipped or not: one suite, parametrized over the tasks.

For each task (the shipped ones and the example in examples/, which deqray
does not ship) a short Ray Train run of one worker, with the Jacobian loss
and the spectral radius on so that every metric the platform declares is
reported, and the same run with its worker killed mid-way:

* the training loss falls;
* every metric the task declares (and every one of the platform's) is in
  the report and in TensorBoard, and the report holds nothing undeclared;
* the killed run resumes from its checkpoint on the same trajectory.

Cost: two runs of about 10 s each per task.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from deqray.train.driver import fit, read_metrics, resolve
from deqray.train.report import report_metrics, task_metrics
from deqray.train.tensorboard import tag_for

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "optim.steps=16",
    "train.pretrain_steps=4",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.eval_sradius=true",
    "train.log_every=1000",
    "reg.jac_loss_weight=0.1",
    "reg.jac_loss_freq=1.0",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "checkpoint.keep=null",
]
TASKS = {
    "language_model": (
        "markov-tiny",
        [
            "data.options={tokens: 20000}",
            "optim.batch_size=8",
            "optim.lr=0.003",
            "model.dropout=0.1",
        ],
    ),
    "image_classification": (
        "digits-tiny",
        ["data.deterministic=true", "optim.batch_size=16", "optim.lr=0.003"],
    ),
    "segmentation": (
        "shapes-mdeq-tiny",
        [
            "data.options={train_images: 64, test_images: 16, size: 16}",
            "data.crop_size=[16, 16]",
            "data.deterministic=true",
            "optim.batch_size=8",
            "deq.f_thres=8",
            "deq.b_thres=8",
        ],
    ),
    "deblur (examples/)": (
        str(ROOT / "examples/deblur/experiment.yaml"),
        ["optim.batch_size=16", "optim.lr=0.01", "data.train_size=512", "data.eval_size=64"],
    ),
}


@pytest.fixture(scope="module", params=list(TASKS))
def runs(request, ray_session, tmp_path_factory):
    config, overrides = TASKS[request.param]
    cache = tmp_path_factory.mktemp("data")
    storage = tmp_path_factory.mktemp("runs")
    cfg = resolve(config, [*COMMON, *overrides, f"data.cache={cache}"])
    whole = fit(cfg, workers=1, storage=str(storage), verbose=False)
    killed = fit(
        cfg,
        ["debug.fail_at_step=10", "checkpoint.max_failures=1"],
        workers=1,
        storage=str(storage),
        verbose=False,
    )
    return cfg, whole, killed


def test_the_run_finishes_and_its_loss_falls(runs):
    cfg, whole, _ = runs
    assert whole.error is None and whole.return_value["status"] == "finished"
    rows = read_metrics(whole.path)
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
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
        assert [e.step for e in acc.Scalars(tag_for(m.name))] == [4, 8, 12, 16]


def test_a_killed_worker_resumes_on_the_same_trajectory(runs):
    cfg, whole, killed = runs
    assert killed.return_value["status"] == "finished"
    assert os.listdir(os.path.join(killed.path, "_faults")) == ["step-10"]
    a, b = read_metrics(whole.path), read_metrics(killed.path)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", task_metrics(cfg)[0].name, "val_fwd_nstep"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-7), (ra["step"], key)
