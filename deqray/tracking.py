"""MLflow tracking of runs and studies, through Ray's own MLflow integration.

    tracking:                         # in an experiment file, or a study file's top level
      mlflow:
        uri: http://127.0.0.1:5000    # a tracking server (or sqlite:////abs/mlflow.db)
        experiment_name: my-sweeps    # default: the config's stem / the study's name

`deqray train`: `setup_mlflow` on rank 0 of the workers makes one MLflow run,
named after the run's directory, with the whole config as parameters
(flattened to dotted keys) and every report's metrics at its optimiser step:
the objectives, the training interval's solver statistics `fwd_nstep`,
`fwd_rel_residual`, `bwd_nstep`, ..., the evaluation's `val_fwd_*`. A run
resumed from a checkpoint starts a new MLflow run of the same name, whose
metric histories continue at the step it resumed at; the tag `deqray.status`
records how the run ended (finished, stopped, diverged).

`deqray tune`: every trial is such a run, in the study's MLflow experiment
(default: the study's name), named after the trial (`t03-lr0.0031-...`, its
run's directory), its sampled values among the parameters under the space's
dotted keys, and tagged `deqray.trial`. (Tune's `MLflowLoggerCallback`, on the
study's driver, was tried first: its 1-3 s per result on this machine stalled
the driver, and a trial whose last report arrived then never ended - its
function trainable blocked putting the result on its own queue.)

The MLflow server must be reachable from the worker that holds rank 0 of each
run or trial: on a cluster, a server every node can reach, not a path on one
machine's disk.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from deqray.config import Experiment, Tracking


def trial_overrides(tracking: Tracking, study_name: str) -> dict[str, str | None]:
    """The overrides that point a study's trial at the study's MLflow experiment:
    the study's `tracking` section, which wins over the base experiment's."""
    m = tracking.mlflow
    return {
        "tracking.mlflow.uri": m.uri,
        "tracking.mlflow.experiment_name": (m.experiment_name or study_name) if m.uri else None,
    }


class MLflowRun:
    """Rank 0's MLflow run of a training run: what `setup_mlflow` started."""

    def __init__(self, mlflow: Any) -> None:
        self.mlflow = mlflow  # the mlflow module, its active run this one

    @classmethod
    def start(
        cls, exp: Experiment, run_uri: str, step: int, trial: str | None = None
    ) -> MLflowRun | None:
        """The run's MLflow run (None without tracking), its parameters logged;
        `trial`: the study's trial it is. Call on rank 0 only: the others have
        nothing to log."""
        m = exp.tracking.mlflow
        if m.uri is None:
            return None
        from ray.air.integrations.mlflow import setup_mlflow

        name = run_uri.rstrip("/").rsplit("/", 1)[-1]
        tags = {"deqray.run_uri": run_uri, "deqray.start_step": str(step)}
        if trial is not None:
            tags["deqray.trial"] = trial
        from mlflow.exceptions import MlflowException

        kwargs = dict(
            config=flat_params(exp.to_dict()),
            tracking_uri=m.uri,
            experiment_name=m.experiment_name or default_experiment_name(exp),
            run_name=name,
            create_experiment_if_not_exists=True,
            tags=tags,
            rank_zero_only=True,
        )
        try:
            mlflow = setup_mlflow(**kwargs)
        except MlflowException as e:
            # a study's first trials start together: each finds no experiment and
            # creates it, and all but one are refused; the experiment is there now
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            mlflow = setup_mlflow(**kwargs)
        return cls(mlflow)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """A report's numeric metrics (status and reason are text: tagged at the end)."""
        self.mlflow.log_metrics(numeric(metrics), step=step)

    def end(self, status: str | None) -> None:
        """`status`: how the run ended (finished, stopped, diverged), None if it did not."""
        if status is not None:
            self.mlflow.set_tag("deqray.status", status)
        self.mlflow.end_run()


def default_experiment_name(exp: Experiment) -> str:
    return Path(exp.source).stem if exp.source else "deqray"


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries MLflow takes as metrics: numbers (bools are not metrics)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """A config mapping as {dotted.key: value}, the keys its overrides use; an empty
    section gives no parameter."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value
    return out
