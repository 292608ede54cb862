"""MLflow tracking (`tracking: {mlflow: ...}`) against a real MLflow server.

The module starts `mlflow server` on 127.0.0.1 (SQLite backend, artifacts in
a temporary directory), runs a 2-trial study through `deqray tune` and a
3-report `deqray.train.fit`, each pointed at it, and reads back with
MLflow's own client what Ray's `setup_mlflow` logged from rank 0: one MLflow
run per trial (or per training run), its parameters, and metric histories
that match, report by report, the run's own metrics.jsonl (the objectives and
the solver's statistics). The loaders' checks of the section run without Ray.

Cost on the 2-core machine, alone (2026-12-02): the server starts in 16 s,
the study takes 103 s, the training run 34 s, the loader checks under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from deqray.config import CONFIG_DIR, ConfigError, load_config
from deqray.train.files import read_metrics
from deqray.tune.runner import load_results
from deqray.tune.study import load_study
from tests.s3_server import free_port
from tests.shared_runs import LM, data_cache
from tests.test_tune import GOOD, GOOD2, deqray_tune, study_file

# what MLflow must hold for every report, beside the objectives: the solver's statistics
SOLVER = ["fwd_nstep", "fwd_rel_residual", "val_fwd_nstep", "val_fwd_rel_residual"]


@pytest.fixture(scope="module")
def mlflow_uri():
    """A real MLflow tracking server on 127.0.0.1, stopped (by its process group) and
    removed at the end of the module."""
    pytest.importorskip("mlflow")  # deqray[dev] installs it; the suite runs with dev
    root = Path(tempfile.mkdtemp(prefix="deqray-mlflow-"))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    saved = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no network here to send it to
    # no job runner (MLflow's GenAI evaluation jobs): two fewer processes on 2 cores
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the web workers stop with it
    )
    try:
        # 10-20 s on a quiet machine (database migrations, then the app's imports);
        # minutes beside other test sessions on the same 2 cores
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if saved is None:
            os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
        else:
            os.environ["MLFLOW_DISABLE_TELEMETRY"] = saved
        shutil.rmtree(root, ignore_errors=True)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- #
# a study: one MLflow run per trial, from the trial's rank 0
# --------------------------------------------------------------------------- #


def test_a_study_logs_one_mlflow_run_per_trial(mlflow_uri, tmp_path, tmp_path_factory):
    # The base experiment tracks to another MLflow experiment: the study's own
    # section wins.
    base = yaml.safe_load((CONFIG_DIR / "markov-tiny.yaml").read_text())
    base["tracking"] = {"mlflow": {"uri": mlflow_uri, "experiment_name": "trial-workers"}}
    base_file = tmp_path / "base.yaml"
    base_file.write_text(yaml.safe_dump(base))
    path = study_file(
        tmp_path,
        str(data_cache(tmp_path_factory)),
        base=str(base_file),
        trials=2,
        scheduler={"name": "none"},  # both trials make all 4 reports
        points_to_evaluate=[GOOD, GOOD2],
        tracking={"mlflow": {"uri": mlflow_uri, "experiment_name": "sweep"}},
    )
    out = deqray_tune(path, "--storage", tmp_path / "exp", "--name", "s")
    assert f"mlflow: {mlflow_uri}, experiment sweep" in out
    result = load_results(str(tmp_path / "exp" / "s"))
    assert len(result.rows) == 2

    client = _client(mlflow_uri)
    assert client.get_experiment_by_name("trial-workers") is None
    sweep = client.get_experiment_by_name("sweep")
    runs = client.search_runs([sweep.experiment_id])
    assert len(runs) == 2
    space = ["optim.lr", "deq.f_thres", "deq.f_solver"]
    by_params = {tuple(r.data.params[k] for k in space): r for r in runs}
    assert set(by_params) == {tuple(str(p[k]) for k in space) for p in (GOOD, GOOD2)}
    for row in result.rows:
        run = by_params[tuple(str(row[k]) for k in space)]
        assert run.info.run_name == row["trial"] and run.data.tags["deqray.trial"] == row["trial"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["deqray.status"] == "finished"
        assert run.data.tags["deqray.run_uri"] == row["run"]
        # the trial's whole config: the study's fixed overrides too
        assert run.data.params["optim.steps"] == "24" and run.data.params["optim.batch_size"] == "8"
        assert run.data.params["tracking.mlflow.experiment_name"] == "sweep"
        reports = read_metrics(row["run"])
        assert [r["step"] for r in reports] == [6, 12, 18, 24]
        for key in ["val_ppl", *SOLVER]:
            expected = [(r["step"], pytest.approx(r[key], rel=1e-9)) for r in reports]
            assert _history(client, run.info.run_id, key) == expected, key
        # the backward solver runs in DEQ mode only: after the 6 pretraining steps
        deq = [(r["step"], r["bwd_nstep"]) for r in reports if "bwd_nstep" in r]
        assert len(deq) == 3 and all(v > 0 for _, v in deq)
        assert _history(client, run.info.run_id, "bwd_nstep") == deq


# --------------------------------------------------------------------------- #
# a training run: setup_mlflow on rank 0
# --------------------------------------------------------------------------- #


def test_a_training_run_logs_its_config_and_every_report(
    mlflow_uri, tmp_path, tmp_path_factory, ray_clean
):
    from deqray.train.driver import fit

    overrides = [
        *LM,
        f"data.cache={data_cache(tmp_path_factory)}",
        "optim.steps=12",
        "train.pretrain_steps=4",
        "train.eval_every=4",
        f"tracking.mlflow.uri={mlflow_uri}",
    ]
    result = fit("markov-tiny", overrides, storage=str(tmp_path), verbose=False)
    assert result.return_value["status"] == "finished"
    reports = read_metrics(result.path)
    assert [r["step"] for r in reports] == [4, 8, 12]

    client = _client(mlflow_uri)
    experiment = client.get_experiment_by_name("markov-tiny")  # the config's stem by default
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == os.path.basename(result.path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["deqray.status"] == "finished"
    assert run.data.tags["deqray.run_uri"] == result.path
    # the whole config as dotted keys, as its overrides name them
    params = run.data.params
    assert params["optim.steps"] == "12" and params["optim.lr"] == "0.003"
    assert params["data.options.tokens"] == "20000"
    assert params["model.preset"] == "deq-transformer-tiny"
    assert params["deq.f_thres"] == "20" and params["tracking.mlflow.uri"] == mlflow_uri
    # every report at its optimiser step, the same values as metrics.jsonl
    for key in ["val_ppl", "train_loss", "lr", *SOLVER]:
        expected = [(r["step"], pytest.approx(r[key], rel=1e-9)) for r in reports]
        assert _history(client, run.info.run_id, key) == expected, key
    deq = [(r["step"], r["bwd_nstep"]) for r in reports if "bwd_nstep" in r]
    assert [s for s, _ in deq] == [8, 12] and all(v > 0 for _, v in deq)
    assert _history(client, run.info.run_id, "bwd_nstep") == deq
    assert "status" not in run.data.metrics  # text stays out of the metrics


# --------------------------------------------------------------------------- #
# the loaders' checks of the section (no Ray, no server)
# --------------------------------------------------------------------------- #


def _experiment_file(tmp_path, tracking) -> Path:
    body = yaml.safe_load((CONFIG_DIR / "markov-tiny.yaml").read_text())
    body["tracking"] = tracking
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize(
    "tracking, key, words",
    [
        ({"mlflow": {"ur": "http://x"}}, "tracking.mlflow.ur", "did you mean 'uri'"),
        ({"mlfow": {"uri": "http://x"}}, "tracking.mlfow", "did you mean 'mlflow'"),
        ({"mlflow": {"uri": 5}}, "tracking.mlflow.uri", "expected str | null, got 5"),
        ({"mlflow": "http://x"}, "tracking.mlflow", "expected a section"),
        ({"mlflow": {"uri": " "}}, "tracking.mlflow.uri", "is empty"),
        (
            {"mlflow": {"experiment_name": "x"}},
            "tracking.mlflow.experiment_name",
            "without tracking.mlflow.uri",
        ),
    ],
)
def test_a_bad_tracking_section_names_the_file_and_key(tmp_path, tracking, key, words):
    exp = _experiment_file(tmp_path, tracking)
    with pytest.raises(ConfigError) as e:
        load_config(exp)
    assert str(e.value).startswith(f"{exp}: ") and key in str(e.value) and words in str(e.value)

    study = study_file(tmp_path, str(tmp_path / "cache"), tracking=tracking)
    with pytest.raises(ConfigError) as e:
        load_study(study)
    assert str(e.value).startswith(f"{study}: ") and key in str(e.value) and words in str(e.value)


def test_without_mlflow_installed_the_section_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails
    exp = _experiment_file(tmp_path, {"mlflow": {"uri": "http://127.0.0.1:5000"}})
    with pytest.raises(ConfigError, match=r"tracking\.mlflow\.uri: MLflow is not installed"):
        load_config(exp)
    study = study_file(tmp_path, "cache", tracking={"mlflow": {"uri": "http://127.0.0.1:5000"}})
    with pytest.raises(ConfigError) as e:
        load_study(study)
    assert str(e.value) == (
        f"{study}: tracking.mlflow.uri: MLflow is not installed: pip install 'deqray[tracking]'"
    )
    assert load_config(exp, ["tracking.mlflow.uri=null"]).tracking.mlflow.uri is None


def test_a_study_takes_its_own_section_else_the_base_experiments(tmp_path):
    pytest.importorskip("mlflow")
    own = {"mlflow": {"uri": "http://a:5000", "experiment_name": "a"}}
    s = load_study(study_file(tmp_path, "cache", tracking=own))
    assert (s.tracking.mlflow.uri, s.tracking.mlflow.experiment_name) == ("http://a:5000", "a")
    # a command-line change of the study's section changes that section
    s = load_study(study_file(tmp_path, "cache", tracking=own), ["tracking.mlflow.uri=http://b"])
    assert (s.tracking.mlflow.uri, s.tracking.mlflow.experiment_name) == ("http://b", "a")
    again = type(s).from_dict(s.to_dict(), "saved")
    assert again.tracking == s.tracking

    # without one, the base experiment's (here through the study's overrides)
    plain = study_file(tmp_path, "cache")
    s = load_study(plain, ["tracking.mlflow.uri=http://c"])
    assert s.tracking.mlflow.uri == "http://c" and s.fixed.tracking.mlflow.uri == "http://c"
    assert type(s).from_dict(s.to_dict(), "saved").tracking == s.tracking
    assert load_study(plain).tracking.mlflow.uri is None

    # both: the study says which one it means
    body = yaml.safe_load(plain.read_text())
    body["overrides"]["tracking.mlflow.uri"] = "http://d"
    body["tracking"] = own
    plain.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=r"tracking: also given as overrides\.tracking"):
        load_study(plain)
