"""deqray.tune end to end: Ray Tune trials that each fit a TorchTrainer, sampled by Optuna.

A 4-trial study, 2 at a time of 1 worker each, on the embedded Markov
corpus; an interrupted study resumed; `deqray compare` on the result.

Each study runs as `deqray tune` in a subprocess with its own local Ray
(RAY_ADDRESS=local), as a user runs it. Inside the pytest process, Tune's
later trials waited forever for their first data read (not reproduced in a
plain Python process with the same ray.init): the subprocess also keeps a
hung study from hanging the session. The processes are stopped by PID.

Cost on the 2-core machine (2026-12-02): the 4-trial study 65 s on a quiet
machine, 165 s beside other Ray tests; the resume 95 s, 350 s beside them.
Training is 2-3 s of each trial; the rest is Ray starting (a local instance per
`deqray tune`, about 12 s) and each trial's driver, controller and worker
processes (15-40 s a trial), so fewer steps or reports would save little.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from deqray.tune.console import trial_label
from deqray.tune.runner import OPTUNA_DB, load_results
from deqray.tune.study import pareto_front
from tests.dashboard_client import dashboard_trials
from tests.tensorboard_client import scalar_tags, scalars, tensorboard_server


def deqray_tune(*args, timeout=600, wait=True):
    env = dict(
        os.environ,
        RAY_ADDRESS="local",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
    )
    cmd = [sys.executable, "-m", "deqray.cli", "tune", *map(str, args)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"deqray tune did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


GOOD = {"optim.lr": 0.004, "deq.f_thres": 12, "deq.f_solver": "anderson"}
GOOD2 = {"optim.lr": 0.003, "deq.f_thres": 6, "deq.f_solver": "anderson"}
BAD = {"optim.lr": 0.0001, "deq.f_thres": 4, "deq.f_solver": "anderson"}
SPACE = ["optim.lr", "deq.f_thres", "deq.f_solver"]  # study_file's, in its order


def study_file(tmp_path, cache, **changes):
    body = {
        "base": "markov-tiny",
        "overrides": {
            "data.options": {"tokens": 20000},
            "data.cache": cache,
            "optim.batch_size": 8,
            "optim.steps": 24,
            "optim.warmup_steps": 0,
            "train.pretrain_steps": 6,
            "train.eval_every": 6,
            "train.eval_batches": 3,
            "deq.eval_f_thres": None,
        },
        "objectives": {"val_ppl": "min", "val_fwd_nstep": "min"},
        "space": {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "deq.f_thres": {"type": "int", "low": 4, "high": 16, "step": 2},
            "deq.f_solver": {"type": "categorical", "choices": ["anderson", "broyden"]},
        },
        "sampler": {"name": "tpe", "n_startup_trials": 2},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "trials": 4,
        "concurrency": 2,
        # A quarter CPU per worker: two trials and their data reads fit on 2
        # CPUs even while Ray Train still holds a finished trial's workers
        # (with half a CPU, the third trial's first read waited forever).
        "resources": {"workers": 1, "cpus_per_worker": 0.25},
        "seed": 0,
        # two good settings first: the bad one then meets ASHA's recorded rungs
        "points_to_evaluate": [GOOD, GOOD2, BAD],
    }
    body.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tune-data"))


def test_a_four_trial_study(cache, tmp_path):
    import optuna

    out = deqray_tune(study_file(tmp_path, cache), "--storage", tmp_path / "exp", "--name", "s")
    assert "Pareto front of 4 trials" in out and "tensorboard --logdir" in out
    result = load_results(str(tmp_path / "exp" / "s"))
    rows = result.rows
    assert len(rows) == 4
    by_lr = {r["optim.lr"]: r for r in rows}
    # ASHA stopped the bad trial at its first rung; the good ones ran to the end
    assert by_lr[BAD["optim.lr"]]["status"] == "stopped early"
    assert by_lr[BAD["optim.lr"]]["reports"] < 4
    assert by_lr[GOOD["optim.lr"]]["status"] == "finished"
    assert by_lr[GOOD["optim.lr"]]["reports"] == 4
    for r in rows:
        assert math.isfinite(r["val_ppl"]) and r["val_fwd_nstep"] > 0

    # the Optuna storage holds every trial, with the objectives Tune saw
    db = os.path.join(result.experiment, OPTUNA_DB)
    ot = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert len(ot.trials) == 4
    assert {t.state for t in ot.trials} == {optuna.trial.TrialState.COMPLETE}
    seen = sorted(round(t.values[0], 6) for t in ot.trials)
    assert seen == sorted(round(r["val_ppl"], 6) for r in rows)

    # the front: the non-dominated trials among those that ran to the end (brute force)
    objs = {"val_ppl": "min", "val_fwd_nstep": "min"}
    done = [i for i, r in enumerate(rows) if r["status"] == "finished"]
    pts = {i: (rows[i]["val_ppl"], rows[i]["val_fwd_nstep"]) for i in done}
    brute = [
        i
        for i, p in pts.items()
        if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts.values())
    ]
    assert sorted(result.front) == sorted(brute)
    assert sorted(done[k] for k in pareto_front([rows[i] for i in done], objs)) == sorted(brute)

    # outputs: tables, plot, and TensorBoard with the HParams of every trial
    for name in ("results.csv", "results.parquet", "study.png"):
        assert os.path.getsize(os.path.join(result.experiment, name)) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for r in rows:
        # the trial's name: its number and sampled values, also its run's directory
        number = int(r["trial"][1:3])
        expected = trial_label(number, {k: r[k] for k in SPACE}, SPACE)
        assert r["trial"] == expected
        assert r["run"] == os.path.join(result.experiment, "runs", r["trial"])
        acc = EventAccumulator(os.path.join(r["run"], "tensorboard"))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        ).session_start_info
        hp = {k: v for k, v in start.hparams.items()}
        assert hp["optim.lr"].number_value == pytest.approx(r["optim.lr"])
        assert hp["deq.f_solver"].string_value == r["deq.f_solver"]
        assert hp["deq.f_thres"].number_value == r["deq.f_thres"]
        # the objectives' own curve, one point per report
        assert len(acc.Scalars("Objectives/val_ppl")) == r["reports"]
    assert sorted(int(r["trial"][1:3]) for r in rows) == [0, 1, 2, 3]

    check_tensorboard(result)
    check_dashboard(result)
    check_terminal(out, result)

    # deqray compare reprints the summary from the files
    from deqray.cli import main

    assert main(["compare", result.experiment]) == 0


def check_tensorboard(result):
    """TensorBoard, as its HTTP API serves the experiment: one run per trial, under the
    trial's name, the objectives' cards first, and no card of a constant."""
    with tensorboard_server(result.experiment) as url:
        runs = scalar_tags(url)
        expected = {f"runs/{r['trial']}/tensorboard": r for r in result.rows}
        assert set(runs) == set(expected)  # Tune's own TensorBoard logger is off
        for run, tags in runs.items():
            # TensorBoard orders cards by tag code point by code point (numbers by value)
            assert tags[:2] == ["Objectives/val_fwd_nstep", "Objectives/val_ppl"], tags
            assert "val/ppl" not in tags  # not twice
            # jac_loss_weight is a schedule: a point when it changes, not one per report
            weights = scalars(url, run, "jacobian/jac_loss_weight")
            values = [v for _, v in weights]
            assert weights and all(values[i] != values[i + 1] for i in range(len(values) - 1))
            ppl = scalars(url, run, "Objectives/val_ppl")
            assert ppl[-1][1] == pytest.approx(expected[run]["val_ppl"], rel=1e-6)


def check_dashboard(result):
    """`deqray dashboard EXPERIMENT` serves every trial with its objective values; the
    Optuna trial number is the one in the trial's name."""
    trials = dashboard_trials(result.experiment)
    assert len(trials) == len(result.rows) == 4
    by_number = {int(r["trial"][1:3]): r for r in result.rows}
    for t in trials:
        r = by_number[t["number"]]
        assert t["state"] == "Complete"
        assert t["values"] == [
            pytest.approx(r["val_ppl"], rel=1e-9),
            pytest.approx(r["val_fwd_nstep"], rel=1e-9),
        ]
        assert t["params"]["deq.f_solver"] == r["deq.f_solver"]
        # optuna-dashboard serves each value as the text of its external representation
        assert float(t["params"]["optim.lr"]) == pytest.approx(r["optim.lr"])
        assert int(t["params"]["deq.f_thres"]) == r["deq.f_thres"]


def check_terminal(out: str, result):
    """The terminal: the trial lines, the table, the summary; Ray's output in ray.log."""
    lines = out.splitlines()
    # Tune's table every minute (11 lines for 4 trials); everything else fits in 45 lines
    tables = out.count("== Status ==")
    assert 1 <= tables and len(lines) <= 45 + 11 * tables, out
    for r in result.rows:
        assert f"[deqray] {r['trial']} started" in lines, out
        end = [x for x in lines if x.startswith(f"[deqray] {r['trial']} ") and "after" in x]
        how = {"finished": "finished after", "stopped early": "stopped early by the scheduler"}
        assert len(end) == 1 and how[r["status"]] in end[0], (end, r["status"])
        assert f"after {r['reports']} reports: val_ppl {r['val_ppl']:.4g}" in end[0]
    # the workers' and Ray's own output: not here, in the experiment's log
    # (a line may still come as Ray shuts down, once deqray tune has printed everything)
    assert "pid=" not in out.split("tensorboard --logdir")[0], out
    log = open(os.path.join(result.experiment, "ray.log")).read()
    assert "RayTrainWorker pid=" in log or "TrainController pid=" in log
    assert f"Ray's output: {result.experiment}/ray.log" in out


def test_an_interrupted_study_resumes_without_rerunning_finished_trials(cache, tmp_path):
    path = study_file(tmp_path, cache, scheduler={"name": "none"}, trials=3, concurrency=1)
    exp = tmp_path / "exp"
    proc = deqray_tune(path, "--storage", exp, "--name", "r", wait=False)
    try:
        # interrupt once the first trial finished and the second started
        deadline = time.time() + 300
        while time.time() < deadline:
            runs = exp / "r" / "runs"
            done = [
                d
                for d in (os.listdir(runs) if runs.exists() else [])
                if (runs / d / "status.json").exists()
            ]
            if done and len(os.listdir(runs)) >= 2:
                break
            time.sleep(0.25)
        else:
            pytest.fail("the study did not get going")
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: Tune saves its state and stops
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    first = load_results(str(exp / "r"))
    finished = {r["trial_id"]: r["reports"] for r in first.rows if r["status"] == "finished"}
    assert finished

    deqray_tune(path, "--storage", exp, "--name", "r", "--resume")
    result = load_results(str(exp / "r"))
    assert len(result.rows) == 3
    assert all(r["status"] == "finished" for r in result.rows)
    for r in result.rows:
        if r["trial_id"] in finished:
            # not run again: the same reports as before the interruption
            assert r["reports"] == finished[r["trial_id"]]
    import optuna

    ot = optuna.load_study(study_name="r", storage=f"sqlite:///{exp / 'r' / OPTUNA_DB}")
    complete = [t for t in ot.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
