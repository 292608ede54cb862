"""`deqray tune` with its experiment on s3:// (moto, tests/s3_server.py) and its trials in
SQLite kept with the experiment, or in a real PostgreSQL (tests/pg_server.py).

Each study runs as `deqray tune` in a subprocess that joins the session's
Ray (conftest's `ray_address`), as tests/test_tune.py does, stopped by PID.
A "machine" is a working directory and an Optuna cache directory
(DEQRAY_OPTUNA_CACHE) of its own, where the study's driver runs: a study
interrupted on machine A is resumed on machine B, which has never seen A's
files.
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
import yaml

from deqray.cli import main as deqray
from deqray.config import ConfigError
from deqray.data import locate
from deqray.tune.optuna_storage import CACHE_ENV, cache_path
from deqray.tune.runner import OPTUNA_DB, load_results
from deqray.tune.study import load_study

COMPLETE = optuna.trial.TrialState.COMPLETE

# the studies share the session's Ray: a placement group an interrupted one leaves is removed
pytestmark = pytest.mark.usefixtures("ray_clean")


def study_file(tmp_path: Path, cache: str, **changes) -> Path:
    body = {
        "base": "markov-tiny",
        "overrides": {
            "data.options": {"tokens": 20000},
            "data.cache": cache,
            "optim.batch_size": 8,
            "optim.steps": 8,
            "optim.warmup_steps": 0,
            "train.pretrain_steps": 2,
            "train.eval_every": 4,
            "train.eval_batches": 2,
            "deq.eval_f_thres": None,
        },
        "objectives": {"val_ppl": "min"},
        "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 8e-3, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "scheduler": {"name": "none"},
        "trials": 2,
        "concurrency": 1,
        "resources": {"workers": 1, "cpus_per_worker": 0.25},
        "seed": 0,
    }
    body.update(changes)
    for key in body["space"]:  # a searched key is not also fixed
        body["overrides"].pop(key, None)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


class Machine:
    """A working directory and an Optuna cache of its own."""

    def __init__(self, root: Path, name: str, ray_address: str):
        self.ray_address = ray_address
        self.cwd = root / name
        self.cache = root / f"{name}-optuna-cache"
        self.cwd.mkdir()

    def tune(self, *args, wait: bool = True, timeout: float = 400):
        env = dict(
            os.environ,
            RAY_ADDRESS=self.ray_address,
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            **{CACHE_ENV: str(self.cache)},
        )
        cmd = [sys.executable, "-m", "deqray.cli", "tune", *map(str, args)]
        proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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


def interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> str:
    """Ctrl-C (SIGINT: Tune saves its state and stops) once `ready()` holds."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the study ended before the interruption:\n{proc.communicate()[0]}")
            if time.monotonic() > deadline:
                pytest.fail("the study did not get going")
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def trial_runs(runs_uri: str) -> tuple[list[str], list[str]]:
    """(trial runs started, those with a status.json: finished) under an experiment's runs/."""
    loc = locate(runs_uri)
    started = loc.list() if loc.is_dir() else []
    return started, [t for t in started if loc.join(t, "status.json").exists()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tune-data"))


def test_s3_study_resumes_on_another_machine_from_the_sqlite_copy(
    s3_server, s3_bucket, cache, ray_address, tmp_path
):
    """~130 s: a 3-trial study on s3:// interrupted in its second trial on machine A;
    A's SQLite file deleted; resumed on machine B, which reruns the second and samples
    the third; nothing lost, nothing run twice."""
    path = study_file(tmp_path, cache, trials=3)
    root, exp = f"{s3_bucket}/tune", f"{s3_bucket}/tune/s"
    a, b = Machine(tmp_path, "a", ray_address), Machine(tmp_path, "b", ray_address)
    proc = a.tune(path, "--storage", root, "--name", "s", wait=False)

    def second_started():
        started, done = trial_runs(f"{exp}/runs")
        return len(done) >= 1 and len(started) >= 2

    interrupt_when(proc, second_started)
    first = load_results(exp)
    finished = {r["trial_id"]: r for r in first.rows if r["status"] == "finished"}
    assert len(finished) == 1, first.rows

    # the live SQLite file was on A, in A's cache; its copy is in the experiment
    live = Path(cache_path(exp, "s"))
    assert not live.exists()  # this process has the default cache: not A's
    a_file = Path(os.path.join(a.cache, live.name))
    assert a_file.is_file()
    copy = tmp_path / "copy.db"
    copy.write_bytes(locate(f"{exp}/{OPTUNA_DB}").read_bytes())
    seen = optuna.load_study(study_name="s", storage=f"sqlite:///{copy}").trials
    done_before = {t.number: (t.params, t.value) for t in seen if t.state == COMPLETE}
    assert len(done_before) == 1  # the first trial reached the copy when it ended
    a_file.unlink()  # machine A is gone

    b.tune(path, "--storage", root, "--name", "s", "--resume")
    result = load_results(exp)
    assert len(result.rows) == 3 and all(r["status"] == "finished" for r in result.rows)
    for r in result.rows:
        if r["trial_id"] in finished:  # not run again: the same reports
            assert r["reports"] == finished[r["trial_id"]]["reports"] == 2
            assert r["val_ppl"] == finished[r["trial_id"]]["val_ppl"]
    copy.write_bytes(locate(f"{exp}/{OPTUNA_DB}").read_bytes())
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{copy}").trials
    # three trials in all, all complete: the interrupted one told once, none sampled
    # twice, and the one never started before the interruption sampled after it
    assert [t.state for t in trials] == [COMPLETE] * 3
    for number, (params, value) in done_before.items():
        assert (trials[number].params, trials[number].value) == (params, value)
    assert sorted(t.value for t in trials) == sorted(r["val_ppl"] for r in result.rows)
    assert Path(os.path.join(b.cache, live.name)).is_file()
    # nothing written beside either command
    assert list(a.cwd.iterdir()) == [] and list(b.cwd.iterdir()) == []


def test_postgres_study_runs_trials_together_and_resumes_elsewhere(
    pg_url, cache, ray_address, tmp_path, request
):
    """~70 s: 2 trials at a time in a real PostgreSQL, the second 12 times longer (at 4
    times it had sometimes ended too by the time the first's end reached Optuna);
    interrupted once the first ended; resumed from another working directory;
    nothing lost, nothing run twice."""
    space = {
        "optim.lr": {"type": "float", "low": 1e-3, "high": 8e-3, "log": True},
        "optim.steps": {"type": "categorical", "choices": [8, 96]},
    }
    points = [{"optim.lr": 0.003, "optim.steps": 8}, {"optim.lr": 0.004, "optim.steps": 96}]
    path = study_file(tmp_path, cache, space=space, points_to_evaluate=points, concurrency=2)
    a, b = Machine(tmp_path, "a", ray_address), Machine(tmp_path, "b", ray_address)
    exp = tmp_path / "exp"
    db = optuna.storages.RDBStorage(pg_url)  # one pool for all the looks (the server has 50)
    request.addfinalizer(db.engine.dispose)
    proc = a.tune(path, "--storage", exp, "--name", "p", "--optuna-storage", pg_url, wait=False)

    def one_told():  # the short trial's end has reached Optuna
        names = optuna.study.get_all_study_names(db)
        trials = optuna.load_study(study_name="p", storage=db).trials if names else []
        return any(t.state == COMPLETE for t in trials)

    interrupt_when(proc, one_told)
    first = load_results(str(exp / "p"))
    finished = {r["trial_id"]: r for r in first.rows if r["status"] == "finished"}
    assert [r["optim.steps"] for r in finished.values()] == [8], first.rows
    before = optuna.load_study(study_name="p", storage=db).trials
    done_before = {t.number: (t.params, t.value) for t in before if t.state == COMPLETE}
    assert len(done_before) == len(finished)
    # the first two trials ran at the same time
    t0, t1 = before[0], before[1]
    assert t0.datetime_start < (t1.datetime_complete or t1.datetime_start.max)
    assert t1.datetime_start < (t0.datetime_complete or t0.datetime_start.max)
    assert not (exp / "p" / OPTUNA_DB).exists()  # the trials are in the database

    b.tune(path, "--storage", exp, "--name", "p", "--resume")  # the study knows its database
    result = load_results(str(exp / "p"))
    assert len(result.rows) == 2 and all(r["status"] == "finished" for r in result.rows)
    by_steps = {r["optim.steps"]: r for r in result.rows}
    assert by_steps[8]["reports"] == 2 and by_steps[8]["trial_id"] in finished  # not rerun
    assert by_steps[96]["step"] == 96  # the interrupted one went on to its end
    trials = optuna.load_study(study_name="p", storage=db).trials
    assert [t.state for t in trials] == [COMPLETE] * 2
    for number, (params, value) in done_before.items():
        assert (trials[number].params, trials[number].value) == (params, value)
    assert sorted(t.value for t in trials) == sorted(r["val_ppl"] for r in result.rows)
    assert list(a.cwd.iterdir()) == [] and list(b.cwd.iterdir()) == []
    assert not a.cache.exists() and not b.cache.exists()  # no SQLite anywhere


def test_bad_optuna_storage_fails_before_ray_starts(pg_server, cache, tmp_path, capsys):
    """< 1 s: a URL that does not parse, a driver that is missing, a server that refuses,
    a name the database holds already, a resumed study pointed at another database."""
    path = study_file(tmp_path, cache)
    exp = tmp_path / "exp"

    def tune(*args):
        code = deqray(["tune", str(path), "--storage", str(exp), *args])
        return code, capsys.readouterr().err

    code, err = tune("--optuna-storage", "no url")
    assert code == 2 and "--optuna-storage: 'no url' is not a database URL" in err
    code, err = tune("--optuna-storage", "postgresql+nodriver://u@127.0.0.1/x")
    assert code == 2 and "database driver is not installed" in err
    refused = f"postgresql+psycopg2://deqray:hidden@127.0.0.1:{pg_server.port + 1}/none"
    code, err = tune("--optuna-storage", refused)
    assert code == 2 and "cannot open the database" in err
    assert f"deqray:***@127.0.0.1:{pg_server.port + 1}/none" in err and "hidden" not in err
    taken = pg_server.create_database()
    optuna.create_study(study_name="q", storage=taken)
    code, err = tune("--optuna-storage", taken, "--name", "q")
    assert code == 2 and "holds a study named q already" in err
    assert not exp.exists()  # nothing written
    study = load_study(path)
    (exp / "r").mkdir(parents=True)
    (exp / "r" / "study.json").write_text(json.dumps({"study": study.to_dict()}))
    code, err = tune("--name", "r", "--resume", "--optuna-storage", taken)
    assert code == 2 and "keeps its trials in SQLite with the experiment" in err
    with pytest.raises(ConfigError, match="optuna_storage: 'x' is not a database URL"):
        load_study(study_file(tmp_path, cache, optuna_storage="x"))
