"""deqray.train end to end: Ray Train with two CPU workers (gloo) on the embedded data sets.

Each test is one or two short TorchTrainer runs on the session's Ray
instance, or reads a shared one (tests/shared_runs.py): the language
model's uninterrupted run (tests/test_evaluate.py evaluates it,
tests/test_tracking.py reads its MLflow run), the same run stopped,
resumed and broken (the task contract's resume test for the language
model) and the task contract's segmentation run, which has two workers. Runs read their
reports back from `<run>/metrics.jsonl` and TensorBoard's files with
TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from deqray.train.driver import fit, read_metrics, read_status
from tests import shared_runs
from tests.shared_runs import LM

pytestmark = pytest.mark.usefixtures("ray_clean")

VISION = [
    "model.preset=mdeq-cifar-tiny",
    "model.dropout=0.0",
    "model.num_groups=4",
    "data.source=digits",
    "data.image_size=8",
    "data.augment=false",
    "optim.batch_size=16",
    "optim.lr=0.003",
    "optim.schedule=constant",
    "train.log_every=1000",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(shared_runs.data_cache(tmp_path_factory))


@pytest.fixture(scope="module")
def lm_run(ray_session, session_mlflow_uri, tmp_path_factory):
    """The shared language-model run (tests/shared_runs.py): 2 workers, 24 steps, an
    evaluation and a checkpoint every 6, dropout, f_thres jitter, the Jacobian loss on a
    random half of the steps and the spectral radius on."""
    return shared_runs.language_model(tmp_path_factory, session_mlflow_uri)


def run(base, *overrides, cache, storage, workers=2, name=None):
    result = fit(
        {"optim": {"steps": 1}},
        [*base, f"data.cache={cache}", *overrides],
        workers=workers,
        storage=str(storage),
        name=name,
        verbose=False,
    )
    return result, read_metrics(result.path)


def scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    out["_histograms"] = acc.Tags()["histograms"]
    return out


SOLVER_KEYS = [
    "fwd_nstep",
    "fwd_rel_residual",
    "fwd_rel_residual_max",
    "fwd_converged",
    "bwd_nstep",
    "bwd_rel_residual",
    "bwd_rel_residual_max",
]
COMMON_KEYS = ["train_loss", "val_loss", "lr", "step_time", "items_per_s", "status", "step"]


def test_language_model_two_workers(lm_run):
    result, rows = lm_run.result, read_metrics(lm_run.path)
    assert result.error is None
    assert result.return_value["status"] == "finished"
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    last = rows[-1]
    for key in [*COMMON_KEYS, *SOLVER_KEYS, "val_ppl", "jac_loss", "val_sradius", "val_tokens"]:
        assert key in last, key
    # every token of the 4 evaluation batches of both workers, counted once
    assert last["val_tokens"] == 4 * 8 * shared_runs.LM_EVAL_TGT_LEN
    assert math.isclose(last["val_ppl"], math.exp(last["val_loss"]), rel_tol=1e-6)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.1
    assert 0 < last["val_sradius"] < 10
    assert last["fwd_converged"] > 0.9 and last["bwd_nstep"] > 0
    # the Ray result carries the last checkpointed report and a restorable checkpoint
    assert result.metrics["step"] == 24
    assert os.path.exists(os.path.join(result.checkpoint.path, "state.pt"))

    tb = scalars(result.path)
    for tag in [
        "train/loss",
        "val/ppl",
        "solver/fwd_nstep",
        "optim/lr",
        "perf/items_per_s",
    ]:
        assert [s for s, _ in tb[tag]] == [6, 12, 18, 24], tag
    # no backward solver and no Jacobian loss (pretrain weight 0) in steps 0-5
    assert [s for s, _ in tb["solver/bwd_rel_residual_max"]] == [12, 18, 24]
    assert [s for s, _ in tb["jacobian/jac_loss"]] == [12, 18, 24]
    assert math.isclose(tb["val/ppl"][-1][1], last["val_ppl"], rel_tol=1e-5)
    assert any(t.startswith("solver/fwd_rel_residual") for t in tb["_histograms"])


def test_mdeq_two_workers_through_the_cli(cache, tmp_path, capsys):
    from deqray.cli import main

    code = main(
        [
            "train",
            "digits-tiny",
            *VISION,
            f"data.cache={cache}",
            "optim.steps=48",
            "train.pretrain_steps=16",
            "train.eval_every=16",
            "--workers",
            "2",
            "--storage",
            str(tmp_path),
            "--name",
            "mdeq",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "finished at step 48" in out and "val acc" in out
    rows = read_metrics(str(tmp_path / "mdeq"))
    assert [r["step"] for r in rows] == [16, 32, 48]
    last = rows[-1]
    for key in [*COMMON_KEYS, *SOLVER_KEYS, "val_acc", "val_top5", "val_images"]:
        assert key in last, key
    # the test split, divided among the workers (an equal split drops at most one image)
    from deqray.data import load_manifest
    from deqray.tasks._data import embedded_root
    from deqray.train.driver import resolve

    cfg = resolve({"optim": {"steps": 1}}, [*VISION, f"data.cache={cache}"])
    n = load_manifest(embedded_root(cfg.data)).splits["test"].rows
    assert n - 1 <= last["val_images"] <= n
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
    # ten classes, chance 0.1; 48 steps on 2 workers reach 0.42-0.6 by the order
    # the shards arrive in (Ray Data streams them), so 3x chance is the bar
    assert last["val_acc"] > 0.3
    tb = scalars(str(tmp_path / "mdeq"))
    assert [s for s, _ in tb["val/acc"]] == [16, 32, 48]


def test_segmentation_two_workers_loss_falls_and_miou_rises(ray_session, tmp_path_factory):
    # the task contract's segmentation run, which has two workers (tests/shared_runs.py):
    # 64 training and 16 test images of 16 pixels, 16 steps
    seg = shared_runs.contract_run("segmentation", tmp_path_factory)
    rows = read_metrics(seg.path)
    assert seg.workers == 2 and seg.result.return_value["status"] == "finished"
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # four classes: chance is below 0.25 (0.10 at step 4, 0.72 at step 16 when written)
    assert rows[-1]["val_miou"] > max(rows[0]["val_miou"], 0.25)
    assert rows[-1]["val_pixels"] == 16 * 16 * 16  # every test pixel, both workers' halves
    assert all(0 <= rows[-1][f"val_iou_{c}"] <= 1 for c in range(4))


def _trajectory(rows):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def _same(a, b):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (s, tl_a, vl_a), (_, tl_b, vl_b) in zip(a, b, strict=True):
        assert math.isclose(tl_a, tl_b, rel_tol=1e-5, abs_tol=1e-6), (s, tl_a, tl_b)
        assert math.isclose(vl_a, vl_b, rel_tol=1e-5, abs_tol=1e-6), (s, vl_a, vl_b)


def test_worker_failure_and_driver_restart_continue_the_same_trajectory(
    lm_run, session_mlflow_uri, tmp_path_factory
):
    # The shared run (dropout, f_thres jitter, the Jacobian loss on a random
    # half of the steps, memory across segments) is the uninterrupted one; the
    # interrupted one is the task contract's for the language model
    # (tests/shared_runs.py), trained in the same storage.
    storage = lm_run.storage
    assert lm_run.result.return_value["status"] == "finished"
    interrupted = shared_runs.interrupted_run(
        shared_runs.LANGUAGE_MODEL, tmp_path_factory, session_mlflow_uri
    )
    first, second = interrupted.stopped, interrupted.run.result

    # a second run without a name in the same storage is a new run: nothing resumed
    assert first.path != lm_run.path
    assert sorted(os.listdir(storage)) == sorted(
        os.path.basename(r.path) for r in (lm_run.result, first)
    )
    # the driver stops at step 12; a new driver, given its name, resumes it
    assert first.return_value["status"] == "stopped"
    assert first.metrics["step"] == shared_runs.LM_STOP_STEP == 12
    # ... and a worker (rank 1) dies at step 22: Ray Train restarts the workers from a checkpoint
    assert "debug.fail_rank=1" in interrupted.run.overrides and interrupted.fault_step == 22
    assert second.path == first.path
    assert second.return_value["status"] == "finished"
    assert os.listdir(os.path.join(second.path, "_faults")) == ["step-22"]
    _same(_trajectory(read_metrics(lm_run.path)), _trajectory(read_metrics(second.path)))


def test_divergence_is_reported_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    # The loss turns NaN at step 5 (debug.nan_at_step), after two good
    # evaluations (steps 2 and 4), each with its checkpoint.
    result, rows = run(
        LM,
        "optim.steps=40",
        "train.pretrain_steps=0",
        "train.eval_every=2",
        "train.diverge_patience=1",
        "train.max_residual=null",
        "debug.nan_at_step=5",
        cache=cache,
        storage=tmp_path,
        workers=2,
    )
    end = result.return_value
    assert end["status"] == "diverged", rows
    assert "non-finite" in end["reason"]
    assert read_status(result.path)["status"] == "diverged"
    assert rows[-1]["status"] == "diverged" and rows[-1]["reason"] == end["reason"]
    assert end["step"] == 5 and end["reason"] == "non-finite loss (nan) at step 5"
    # the run's latest checkpoint is the last good one: the last report before the divergence
    good = [r for r in rows if r["status"] == "running"]
    assert [r["step"] for r in good] == [2, 4], rows
    assert result.checkpoint is not None
    assert result.metrics["step"] == good[-1]["step"]
    checkpoints = [p for p in os.listdir(result.path) if p.startswith("checkpoint_2")]
    assert len(checkpoints) == len(good)  # none written at or after the divergence
    blob = json.loads(open(os.path.join(result.path, "status.json")).read())
    assert blob["step"] == end["step"]


def test_a_solver_that_stops_converging_ends_the_run(cache, tmp_path):
    # One forward step cannot get the residual under 1e-9: three evaluations
    # in a row over the limit end the run as diverged.
    result, rows = run(
        LM,
        "optim.steps=20",
        "train.pretrain_steps=2",
        "train.eval_every=2",
        "deq.f_thres=1",
        "train.max_residual=1e-9",
        "train.diverge_patience=3",
        cache=cache,
        storage=tmp_path,
        workers=1,
    )
    end = result.return_value
    assert end["status"] == "diverged"
    assert "stopped converging" in end["reason"] and "3 evaluations" in end["reason"]
    # steps 4, 6, 8 are the DEQ-mode evaluations over the limit
    assert end["step"] == 8
    assert result.metrics["step"] == 6  # the last checkpoint: before the divergence


def test_deterministic_vision_splits_keep_the_read_order(cache):
    # The splits decoded once by the driver are executed there, not by Ray
    # Train: they must carry preserve_order themselves, or a resumed run
    # sees its images in another order.
    from deqray.train.context import plan_run
    from deqray.train.driver import resolve

    cfg = resolve(
        {"optim": {"steps": 1}},
        [*VISION, f"data.cache={cache}", "data.deterministic=true"],
        workers=1,
    )
    run = plan_run(cfg)
    orders = []
    for _ in range(3):
        datasets, data_config = run.task.datasets(run)
        assert data_config._user_execution_options.preserve_order
        for ds in datasets.values():
            assert ds.context.execution_options.preserve_order
        orders.append([int(r["label"]) for r in datasets[run.train_split].take_all()])
    assert len(orders[0]) == run.plan.details.rows[run.train_split]
    assert orders[0] == orders[1] == orders[2]
