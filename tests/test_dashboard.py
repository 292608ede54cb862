"""`deqray dashboard`: which trials database it serves, and its errors.

The served API itself is checked on a real study's experiment in
tests/test_tune.py (every trial with its objective values); here, without
Ray: the database chosen for each kind of experiment, the remote SQLite copy
served from a temporary download, and bad experiments named.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import optuna
import pytest

from deqray.config import ConfigError
from deqray.data import locate
from deqray.tune.dashboard import study_storage
from tests.dashboard_client import dashboard_trials


def _experiment(root, optuna_storage=None):
    root.mkdir(parents=True, exist_ok=True)
    study = {"name": "s", "optuna_storage": optuna_storage}
    (root / "study.json").write_text(json.dumps({"source": "s.yaml", "study": study}))
    return root


def _optuna_study(url: str, values: list[float]) -> None:
    study = optuna.create_study(storage=url, study_name="s")
    for v in values:
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": v},
                distributions={"x": optuna.distributions.FloatDistribution(0, 10)},
                value=v,
            )
        )


def test_a_local_experiment_serves_its_own_sqlite_file(tmp_path):
    exp = _experiment(tmp_path / "exp")
    _optuna_study(f"sqlite:///{exp / 'optuna.db'}", [1.0, 2.5, 4.0])
    with study_storage(str(exp)) as url:
        assert url == f"sqlite:///{exp / 'optuna.db'}"
    trials = dashboard_trials(str(exp))
    assert sorted(t["values"][0] for t in trials) == [1.0, 2.5, 4.0]
    assert {t["state"] for t in trials} == {"Complete"}


def test_a_recorded_database_url_is_served_as_it_is(tmp_path):
    db = tmp_path / "elsewhere.db"
    exp = _experiment(tmp_path / "exp", optuna_storage=f"sqlite:///{db}")
    with study_storage(str(exp)) as url:
        assert url == f"sqlite:///{db}"


def test_a_remote_experiment_serves_a_download_of_its_copy(s3_bucket, tmp_path):
    local = tmp_path / "optuna.db"
    _optuna_study(f"sqlite:///{local}", [3.0, 7.0])
    exp = f"{s3_bucket}/dash/exp"
    locate(exp).join("study.json").write_bytes(
        json.dumps({"source": "s.yaml", "study": {"name": "s"}}).encode()
    )
    locate(exp).join("optuna.db").upload(local)
    with study_storage(exp) as url:
        path = url.removeprefix("sqlite:///")
        assert path != str(local)
        with sqlite3.connect(path) as con:
            assert con.execute("select count(*) from trials").fetchone() == (2,)
    assert not os.path.exists(path)  # the download is gone with the server


def test_bad_experiments_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere: no study.json: not an experiment"):
        with study_storage(str(tmp_path / "nowhere")):
            pass
    exp = _experiment(tmp_path / "fresh")
    with pytest.raises(ConfigError, match=r"fresh: no optuna.db"):
        with study_storage(str(exp)):
            pass
    (exp / "study.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"study.json: not a study record"):
        with study_storage(str(exp)):
            pass
    proc = subprocess.run(
        [sys.executable, "-m", "deqray.cli", "dashboard", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "deqray dashboard:" in proc.stderr and "no study.json" in proc.stderr
