"""Trial names and the one-line trial events of `deqray tune`'s terminal (console.py).

No Ray started: the names from sampled values, and the end lines from a
trial's last report. The study itself (names in Tune, TensorBoard, the
dashboard and the terminal) is checked in tests/test_tune.py. Cost: < 1 s.
"""

from __future__ import annotations

import os

import pytest

from deqray.tune.console import MAX_LABEL, TrialNames, trial_end, trial_label

QUICKSTART = ["optim.lr", "deq.f_thres", "deq.f_solver", "reg.jac_loss_weight", "reg.jac_loss_freq"]


def test_a_name_is_the_number_then_each_value_shortened():
    params = {
        "optim.lr": 0.0031234,
        "deq.f_thres": 12,
        "deq.f_solver": "broyden",
        "reg.jac_loss_weight": 0.5321,
        "reg.jac_loss_freq": 0.0,
    }
    assert trial_label(3, params, QUICKSTART) == "t03-lr0.0031-ft12-broyden-jlw0.53-jlf0"


@pytest.mark.parametrize(
    "key, value, part",
    [
        ("model.dropout", 0.25, "dro0.25"),
        ("optim.lr", 1.5e-05, "lr1.5e-05"),
        ("deq.pretrain", True, "prey"),
        ("model.arch", "mdeq/small v2", "mdeq_small_v2"),
    ],
)
def test_values_are_safe_in_a_directory_name(key, value, part):
    name = trial_label(12, {key: value}, [key])
    assert name == f"t12-{part}"
    assert os.sep not in name and " " not in name


def test_a_long_name_is_cut_and_stays_unique_by_its_number():
    keys = [f"k.long_parameter_name_{i}" for i in range(10)]
    params = dict.fromkeys(keys, 123456)
    a, b = trial_label(7, params, keys), trial_label(8, params, keys)
    assert len(a) <= MAX_LABEL and not a.endswith("-")
    assert a != b and a.startswith("t07-lpn")


def test_tune_names_its_trials_by_their_count_less_one():
    # Tune tags its n-th created trial "n_<values>": the first is t00, Optuna's trial 0
    from ray.tune.experiment import Trial

    names = TrialNames(["deq.f_solver"])
    for tag, solver, name in [
        ("1_x", "anderson", "t00-anderson"),
        ("11_x", "broyden", "t10-broyden"),
    ]:
        trial = Trial(
            "trial_function",
            config={"deq.f_solver": solver},
            experiment_tag=tag,
            trial_name_creator=names,
            trial_dirname_creator=names,
            stub=True,  # no trainable registered: only the naming is exercised
        )
        assert str(trial) == name


@pytest.mark.parametrize(
    "result, line",
    [
        (
            {"status": "finished", "training_iteration": 8, "val_ppl": 9.1234, "val_fwd_nstep": 11},
            "finished after 8 reports: val_ppl 9.123, val_fwd_nstep 11",
        ),
        (
            {"status": "running", "training_iteration": 3, "val_ppl": 40.0},
            "stopped early by the scheduler after 3 reports: val_ppl 40",
        ),
        (
            {"status": "diverged", "training_iteration": 2, "reason": "residual 3.1 > 1"},
            "diverged after 2 reports: residual 3.1 > 1",
        ),
        ({}, "stopped early by the scheduler after 0 reports"),
    ],
)
def test_a_trials_end_in_one_line(result, line):
    assert trial_end(result, ["val_ppl", "val_fwd_nstep"]) == line
