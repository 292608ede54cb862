"""Optuna studies in a real PostgreSQL database (tests/pg_server.py), as a cluster keeps them.

Two things a cluster needs from the study's storage, tested with Optuna
directly: trials from two processes at once on one study, and a study whose
process is killed mid-trial, resumed by another process in another working
directory, with no finished trial lost or run again. The trial processes are
real processes (`python -c`), each with its own database connections.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

# A trial process: runs trials of `study` until it holds `complete` finished ones.
# argv: url, study name, log file (JSON lines: one at each trial's start),
# mode ("concurrent": the first trial waits until another process runs one
# too; "hang-at-3": trial 3 never ends; "plain").
TRIALS = r"""
import json, os, sys, time
import optuna
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

url, name, log, mode, complete = sys.argv[1:6]
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = RDBStorage(
    url,
    heartbeat_interval=1,
    grace_period=2,
    failed_trial_callback=RetryFailedTrialCallback(max_retry=1),
)
study = optuna.load_study(study_name=name, storage=storage)
first = True


def objective(trial):
    global first
    x = trial.suggest_float("x", -5.0, 5.0)
    with open(log, "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "number": trial.number, "x": x}) + "\n")
    trial.set_user_attr("pid", os.getpid())
    if mode == "concurrent" and first:
        first = False
        deadline = time.monotonic() + 60
        while True:
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if running >= 2:
                trial.set_user_attr("running_together", running)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the other process never ran a trial at the same time")
            time.sleep(0.05)
    if mode == "hang-at-3" and trial.number == 3:
        time.sleep(600)  # killed here
    return (x - 1.0) ** 2


study.optimize(
    objective,
    callbacks=[MaxTrialsCallback(int(complete), states=(TrialState.COMPLETE,))],
)
"""


def start(url, name, log, mode, complete, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRIALS, url, name, str(log), mode, str(complete)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def log_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_two_processes_run_trials_of_one_study_at_once(pg_url, tmp_path):
    optuna.create_study(study_name="together", storage=pg_url)
    log = tmp_path / "log.jsonl"
    # each stops once the study has 8 finished trials: together they run 8 or a few more
    procs = [start(pg_url, "together", log, "concurrent", 8, tmp_path) for _ in range(2)]
    for p in procs:
        finish(p)
    study = optuna.load_study(study_name="together", storage=pg_url)
    trials = study.get_trials()
    states = {t.state for t in trials}
    assert states == {optuna.trial.TrialState.COMPLETE}, states
    assert [t.number for t in trials] == list(range(len(trials))) and len(trials) >= 8
    pids = {t.user_attrs["pid"] for t in trials}
    assert pids == {p.pid for p in procs}
    # each process's first trial ran while the other's was running
    together = [t for t in trials if "running_together" in t.user_attrs]
    assert len(together) == 2 and {t.user_attrs["pid"] for t in together} == pids
    # every trial ran once, by one process, and its value is its objective
    started = log_lines(log)
    assert sorted(e["number"] for e in started) == [t.number for t in trials]
    for t, e in zip(trials, sorted(started, key=lambda e: e["number"]), strict=True):
        assert (t.params["x"], t.user_attrs["pid"]) == (e["x"], e["pid"])
        assert t.value == pytest.approx((e["x"] - 1.0) ** 2)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_killed_study_resumes_elsewhere_without_losing_or_rerunning_trials(pg_url, tmp_path):
    optuna.create_study(study_name="resume", storage=pg_url)
    log = tmp_path / "log.jsonl"
    here, there = tmp_path / "machine-a", tmp_path / "machine-b"
    here.mkdir()
    there.mkdir()
    first = start(pg_url, "resume", log, "hang-at-3", 8, here)
    deadline = time.monotonic() + 120
    while not any(e["number"] == 3 for e in log_lines(log)):
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "trial 3 never started"
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)  # mid-trial: no chance to tell the database
    first.communicate(timeout=30)
    study = optuna.load_study(study_name="resume", storage=pg_url)
    before = {t.number: t for t in study.get_trials()}
    running = optuna.trial.TrialState.RUNNING
    assert [t.state for t in before.values()][-1] == running and len(before) == 4
    time.sleep(3)  # past the grace period (2 s) of trial 3's last heartbeat

    second = start(pg_url, "resume", log, "plain", 8, there)
    finish(second)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8 and [t.number for t in trials] == list(range(len(trials)))
    # the three finished before the kill are kept as they were
    for n in range(3):
        assert trials[n].state == before[n].state == optuna.trial.TrialState.COMPLETE
        assert (trials[n].params, trials[n].value) == (before[n].params, before[n].value)
    # the interrupted one is failed and retried once, with its parameters, by the new process
    assert trials[3].state == optuna.trial.TrialState.FAIL
    retries = [
        t for t in trials if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == 3
    ]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == trials[3].params
    # every trial started once; the retry of trial 3 is a trial of its own
    # (optuna keeps finished trials by number: none of A's was sampled again)
    started = log_lines(log)
    numbers = [e["number"] for e in started]
    assert sorted(numbers) == [t.number for t in trials]
    by_pid = {e["number"]: e["pid"] for e in started}
    assert all(by_pid[n] == first.pid for n in range(4))
    assert all(by_pid[t.number] == second.pid for t in trials[4:])
    # nothing was kept in either working directory: the study is in the database
    assert list(here.iterdir()) == [] and list(there.iterdir()) == []
