"""MLflow tracking (`tracking: {mlflow: ...}`) of a training run, and the section's checks.

A 3-report `deqray.train.fit` pointed at a real MLflow server on 127.0.0.1
(tests/mlflow_server.py), read back with MLflow's own client: the one MLflow
run that Ray's `setup_mlflow` made on rank 0, its parameters, and metric
histories that match, report by report, the run's own metrics.jsonl. A
study's trials, one MLflow run each, are checked on tests/test_tune.py's
study. The loaders' checks of the section run without Ray.

Cost on the 2-core machine, alone (2026-12-02): the server starts in 16 s,
the training run 34 s, the loader checks under a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from deqray.config import CONFIG_DIR, ConfigError, load_config
from deqray.train.files import read_metrics
from deqray.tune.study import load_study
from tests.mlflow_server import client as mlflow_client
from tests.mlflow_server import history
from tests.shared_runs import LM, data_cache
from tests.test_tune import SOLVER, study_file

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

    client = mlflow_client(mlflow_uri)
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
        assert history(client, run.info.run_id, key) == expected, key
    deq = [(r["step"], r["bwd_nstep"]) for r in reports if "bwd_nstep" in r]
    assert [s for s, _ in deq] == [8, 12] and all(v > 0 for _, v in deq)
    assert history(client, run.info.run_id, "bwd_nstep") == deq
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
