"""deqray.tune end to end: Ray Tune trials that each fit a TorchTrainer, sampled by Optuna.

One 3-trial study, 2 at a time of 1 worker each, on the embedded Markov
corpus, run once for the module and read by every test: ASHA's early stop,
the Optuna storage, the Pareto front, the trials' names and HParams,
TensorBoard's and optuna-dashboard's servers, the terminal, `deqray
compare`, and MLflow tracking (a real server, tests/mlflow_server.py). A
resumed study is tested with its storage (tests/test_storage_tune.py: an
s3:// experiment and SQLite, a local one and PostgreSQL).

Each study runs as `deqray tune` in a subprocess that joins the session's
Ray (conftest's `ray_address`), as a user's joins a running cluster; a local
instance of its own would cost some 12 CPU-s more. Inside the pytest process,
Tune's later trials waited forever for their first data read (not reproduced
in a plain Python process with the same ray.init): the subprocess also keeps
a hung study from hanging the session. The processes are stopped by PID.

Cost on the 2-core machine (2026-12-03): the study 100-130 s beside other
tests, the MLflow server 15 s. Training is 2-3 s of each trial; the rest is
each trial's driver, controller and worker processes starting (15-40 s a
trial), so fewer steps or reports would save little.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from deqray.config import CONFIG_DIR
from deqray.train.files import read_metrics
from deqray.tune.console import trial_label
from deqray.tune.runner import OPTUNA_DB, load_results
from deqray.tune.study import pareto_front
from tests.dashboard_client import dashboard_trials
from tests.mlflow_server import client as mlflow_client
from tests.mlflow_server import history as mlflow_history
from tests.tensorboard_client import scalar_tags, scalars, tensorboard_server


def deqray_tune(*args, address: str, timeout=600):
    env = dict(
        os.environ,
        RAY_ADDRESS=address,
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
    )
    cmd = [sys.executable, "-m", "deqray.cli", "tune", *map(str, args)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
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
# what MLflow must hold for every report, beside the objectives: the solver's statistics
SOLVER = ["fwd_nstep", "fwd_rel_residual", "val_fwd_nstep", "val_fwd_rel_residual"]


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
        "trials": 3,
        "concurrency": 2,
        # A quarter CPU per worker: two trials and their data reads fit on 2
        # CPUs even while Ray Train still holds a finished trial's workers
        # (with half a CPU, the third trial's first read waited forever).
        "resources": {"workers": 1, "cpus_per_worker": 0.25},
        "seed": 0,
        # two good settings first: the bad one then meets ASHA's recorded rungs (the
        # studies of tests/test_storage_tune.py and tests/test_examples.py sample theirs)
        "points_to_evaluate": [GOOD, GOOD2, BAD],
    }
    body.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tune-data"))


@pytest.fixture(scope="module")
def study(cache, mlflow_uri, ray_address, tmp_path_factory):
    """The 3-trial study, run once: every test below reads it. Its trials track to the
    module's MLflow server, in the study's own MLflow experiment, though the base
    experiment names another one (the study's section wins)."""
    tmp = tmp_path_factory.mktemp("study")
    base = yaml.safe_load((CONFIG_DIR / "markov-tiny.yaml").read_text())
    base["tracking"] = {"mlflow": {"uri": mlflow_uri, "experiment_name": "trial-workers"}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    path = study_file(
        tmp,
        cache,
        base=str(tmp / "base.yaml"),
        tracking={"mlflow": {"uri": mlflow_uri, "experiment_name": "sweep"}},
    )
    out = deqray_tune(path, "--storage", tmp / "exp", "--name", "s", address=ray_address)
    return Study(out, load_results(str(tmp / "exp" / "s")), mlflow_uri)


@dataclass(frozen=True)
class Study:
    out: str  # what deqray tune printed
    result: Any  # deqray.tune.runner.load_results of its experiment
    mlflow_uri: str


def test_asha_stops_the_bad_trial_and_the_good_ones_run_to_the_end(study):
    assert "Pareto front of 3 trials" in study.out and "tensorboard --logdir" in study.out
    rows = study.result.rows
    assert len(rows) == 3
    by_lr = {r["optim.lr"]: r for r in rows}
    # ASHA stopped the bad trial at its first rung; the good ones ran to the end
    assert by_lr[BAD["optim.lr"]]["status"] == "stopped early"
    assert by_lr[BAD["optim.lr"]]["reports"] < 4
    assert by_lr[GOOD["optim.lr"]]["status"] == "finished"
    assert by_lr[GOOD["optim.lr"]]["reports"] == 4
    for r in rows:
        assert math.isfinite(r["val_ppl"]) and r["val_fwd_nstep"] > 0


def test_the_optuna_storage_holds_every_trial_with_the_objectives_tune_saw(study):
    import optuna

    result = study.result
    db = os.path.join(result.experiment, OPTUNA_DB)
    ot = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert len(ot.trials) == 3
    assert {t.state for t in ot.trials} == {optuna.trial.TrialState.COMPLETE}
    seen = sorted(round(t.values[0], 6) for t in ot.trials)
    assert seen == sorted(round(r["val_ppl"], 6) for r in result.rows)


def test_the_front_is_the_finished_trials_that_none_dominates(study):
    rows, objs = study.result.rows, {"val_ppl": "min", "val_fwd_nstep": "min"}
    done = [i for i, r in enumerate(rows) if r["status"] == "finished"]
    pts = {i: (rows[i]["val_ppl"], rows[i]["val_fwd_nstep"]) for i in done}
    brute = [  # brute force
        i
        for i, p in pts.items()
        if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts.values())
    ]
    assert sorted(study.result.front) == sorted(brute)
    assert sorted(done[k] for k in pareto_front([rows[i] for i in done], objs)) == sorted(brute)


def test_each_trial_is_named_and_its_run_has_its_hparams(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result = study.result
    for name in ("results.csv", "results.parquet", "study.png"):
        assert os.path.getsize(os.path.join(result.experiment, name)) > 0
    for r in result.rows:
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
        # the objectives' own curve, one point per report (a trial stopped early: its
        # worker may have reported again before Tune's stop reached it)
        points = len(acc.Scalars("Objectives/val_ppl"))
        assert points == r["reports"] if r["status"] == "finished" else points >= r["reports"]
    assert sorted(int(r["trial"][1:3]) for r in result.rows) == [0, 1, 2]


def test_tensorboard_serves_one_run_per_trial(study):
    check_tensorboard(study.result)


def test_the_dashboard_serves_every_trial(study):
    check_dashboard(study.result)


def test_the_terminal_shows_the_trials_and_ray_logs_to_the_experiment(study):
    check_terminal(study.out, study.result)
    assert f"mlflow: {study.mlflow_uri}, experiment sweep" in study.out


def test_deqray_compare_reprints_the_summary_from_the_files(study, capsys):
    from deqray.cli import main

    assert main(["compare", study.result.experiment]) == 0
    assert "Pareto front of 3 trials" in capsys.readouterr().out


def test_mlflow_holds_one_run_per_trial_with_every_report(study):
    """Ray's setup_mlflow on each trial's rank 0: the trial's name, its whole config as
    parameters, and every report's objectives and solver statistics at its step; a
    trial stopped early keeps what it reported."""
    client = mlflow_client(study.mlflow_uri)
    assert client.get_experiment_by_name("trial-workers") is None
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert len(runs) == 3
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {row["trial"] for row in study.result.rows}
    for row in study.result.rows:
        run = by_name[row["trial"]]
        assert run.data.tags["deqray.trial"] == row["trial"]
        assert run.data.tags["deqray.run_uri"] == row["run"]
        for key in SPACE:
            assert run.data.params[key] == str(row[key])
        # the trial's whole config: the study's fixed overrides too
        assert run.data.params["optim.steps"] == "24" and run.data.params["optim.batch_size"] == "8"
        assert run.data.params["tracking.mlflow.experiment_name"] == "sweep"
        reports = read_metrics(row["run"])
        if row["status"] == "finished":
            assert run.info.status == "FINISHED"
            assert run.data.tags["deqray.status"] == "finished"
            assert [r["step"] for r in reports] == [6, 12, 18, 24]
        else:  # its worker may have reported again before Tune's stop reached it
            assert len(reports) >= row["reports"] and reports[0]["step"] == 6
        for key in ["val_ppl", *SOLVER]:
            expected = [(r["step"], pytest.approx(r[key], rel=1e-9)) for r in reports]
            assert mlflow_history(client, run.info.run_id, key) == expected, key
        # the backward solver runs in DEQ mode only: after the 6 pretraining steps
        deq = [(r["step"], r["bwd_nstep"]) for r in reports if "bwd_nstep" in r]
        assert len(deq) == len(reports) - 1 and all(v > 0 for _, v in deq)
        assert mlflow_history(client, run.info.run_id, "bwd_nstep") == deq


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
            # the value Tune got, at its step (a trial stopped early may have one more)
            ppl = dict(scalars(url, run, "Objectives/val_ppl"))
            row = expected[run]
            assert ppl[row["step"]] == pytest.approx(row["val_ppl"], rel=1e-6)


def check_dashboard(result):
    """`deqray dashboard EXPERIMENT` serves every trial with its objective values; the
    Optuna trial number is the one in the trial's name."""
    trials = dashboard_trials(result.experiment)
    assert len(trials) == len(result.rows) == 3
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
    # Tune's table every minute (at most 11 lines); everything else fits in 45 lines
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
