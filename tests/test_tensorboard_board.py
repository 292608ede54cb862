"""A study trial's TensorBoard run (deqray/train/tensorboard.py, TrialBoard): the objectives
as the first group, HParams in the run itself, schedules only when they change.

No Ray: a TensorBoardWriter writes, TensorBoard's EventAccumulator reads.
The same run as a real study writes it is checked in tests/test_tune.py. Cost: < 1 s.
"""

from __future__ import annotations

import os

import pytest

from deqray.train.tensorboard import TensorBoardWriter, TrialBoard


def _read(logdir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logdir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def test_a_trials_run_has_its_objectives_first_and_its_hparams(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    board = TrialBoard(
        hparams={"optim.lr": 0.004, "deq.f_thres": 12, "deq.f_solver": "broyden"},
        objectives=["val_ppl", "val_fwd_nstep"],
    )
    with TensorBoardWriter(tmp_path / "run", board=board) as w:
        w.hparams()
        for step, weight in [(6, 0.0), (12, 0.0), (18, 0.5), (24, 0.5)]:
            w.scalars(
                {
                    "val_ppl": 30.0 - step,
                    "val_fwd_nstep": 10.0,
                    "val_fwd_nstep_max": 12.0,  # not an objective: its usual group
                    "jac_loss_weight": weight,
                    "phase": 0.0 if step <= 6 else 1.0,
                    "train_loss": 1.0 / step,
                },
                step,
            )
    logdir = str(tmp_path / "run" / "tensorboard")
    assert len(os.listdir(logdir)) == 1  # one event file: one run, HParams included
    acc = _read(logdir)
    tags = sorted(acc.Tags()["scalars"])
    assert tags == [
        "Objectives/val_fwd_nstep",
        "Objectives/val_ppl",
        "jacobian/jac_loss_weight",
        "other/phase",
        "solver/val_fwd_nstep_max",
        "train/loss",
    ]
    assert [(e.step, e.value) for e in acc.Scalars("Objectives/val_ppl")] == [
        (6, 24.0),
        (12, 18.0),
        (18, 12.0),
        (24, 6.0),
    ]
    # schedules: a point where the value changes
    assert [(e.step, e.value) for e in acc.Scalars("jacobian/jac_loss_weight")] == [
        (6, 0.0),
        (18, 0.5),
    ]
    assert [(e.step, e.value) for e in acc.Scalars("other/phase")] == [(6, 0.0), (12, 1.0)]

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.004)
    assert start.hparams["deq.f_thres"].number_value == 12
    assert start.hparams["deq.f_solver"].string_value == "broyden"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    assert [m.name.tag for m in experiment.metric_infos] == [
        "Objectives/val_ppl",
        "Objectives/val_fwd_nstep",
    ]


def test_a_plain_run_keeps_every_report_of_a_metric_that_is_no_schedule(tmp_path):
    with TensorBoardWriter(tmp_path / "run") as w:
        w.hparams()  # no board: nothing
        for step in (1, 2, 3):
            w.scalars({"val_ppl": 5.0, "lr": 1e-3}, step)
    acc = _read(str(tmp_path / "run" / "tensorboard"))
    assert [e.step for e in acc.Scalars("val/ppl")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("optim/lr")] == [1, 2, 3]
    with pytest.raises(KeyError):  # no HParams written without a board
        acc.PluginTagToContent("hparams")
