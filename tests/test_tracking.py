"""MLflow tracking (`tracking: {mlflow: ...}`) of a training run, and the section's checks.

The shared language-model run of tests/shared_runs.py (2 workers, 24 steps,
4 reports) tracks to a real MLflow server on 127.0.0.1 (the session's,
tests/mlflow_server.py); read back with MLflow's own client: the one MLflow
run that Ray's `setup_mlflow` made on rank 0, its parameters, and metric
histories that match, report by report, the run's own metrics.jsonl. A
study's trials, one MLflow run each, are checked on tests/test_tune.py's
study. The loaders' checks of the section run without Ray.

Cost: none of its own beyond the shared run and the server's start (10-20 s);
the loader checks under a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from deqray.config import CONFIG_DIR, ConfigError, load_config
from deqray.tracking import default_experiment_name
from deqray.train.files import read_metrics
from deqray.tune.study import load_study
from tests import shared_runs
from tests.mlflow_server import client as mlflow_client
from tests.mlflow_server import history
from tests.test_tune import SOLVER, study_file

# --------------------------------------------------------------------------- #
# a training run: setup_mlflow on rank 0
# --------------------------------------------------------------------------- #


def test_a_training_run_logs_its_config_and_every_report(
    session_mlflow_uri, tmp_path_factory, ray_session
):
    lm = shared_runs.language_model(tmp_path_factory, session_mlflow_uri)
    assert lm.result.return_value["status"] == "finished"
    reports = read_metrics(lm.path)
    assert [r["step"] for r in reports] == [6, 12, 18, 24]

    client = mlflow_client(session_mlflow_uri)
    # a config given as a dict has no file whose stem would name the experiment
    experiment = client.get_experiment_by_name("deqray")
    # other runs of its settings (tests/test_train.py's resumed ones) track there too
    name = os.path.basename(lm.path)
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]
    assert run.info.status == "FINISHED"
    assert run.data.tags["deqray.status"] == "finished"
    assert run.data.tags["deqray.run_uri"] == lm.path
    # the whole config as dotted keys, as its overrides name them
    params = run.data.params
    assert params["optim.steps"] == "24" and params["optim.lr"] == "0.003"
    assert params["data.options.tokens"] == "20000"
    assert params["model.preset"] == "deq-transformer-tiny"
    assert params["deq.f_thres_jitter"] == "3" and params["model.dropout"] == "0.1"
    assert params["tracking.mlflow.uri"] == session_mlflow_uri
    # every report at its optimiser step, the same values as metrics.jsonl
    for key in ["val_ppl", "train_loss", "lr", *SOLVER]:
        expected = [(r["step"], pytest.approx(r[key], rel=1e-9)) for r in reports]
        assert history(client, run.info.run_id, key) == expected, key
    # the backward solver runs in DEQ mode only: after the 6 pretraining steps
    deq = [(r["step"], r["bwd_nstep"]) for r in reports if "bwd_nstep" in r]
    assert [s for s, _ in deq] == [12, 18, 24] and all(v > 0 for _, v in deq)
    assert history(client, run.info.run_id, "bwd_nstep") == deq
    assert "status" not in run.data.metrics  # text stays out of the metrics


def test_the_experiment_is_named_after_the_config_file_by_default():
    assert default_experiment_name(load_config("markov-tiny")) == "markov-tiny"
    path = CONFIG_DIR / "digits-tiny.yaml"
    assert default_experiment_name(load_config(str(path))) == "digits-tiny"


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
