"""Running a study: Ray Tune trials that each fit a TorchTrainer, sampled by Optuna.

    result = run_study(load_study("search_spaces/quickstart.yaml"))
    result.table()          # best trial, or the Pareto front of a multi-objective study
    result.experiment       # <storage>/<name>: Tune's trial dirs, runs/, optuna.db, results.*

The experiment directory holds Tune's state (one directory per trial, with
Tune's result.json), `runs/<trial name>/` (the trial's training run:
checkpoints, metrics.jsonl, tensorboard/ with its HParams), `ray.log` (Ray's
output, unless `deqray tune -v` showed it), `optuna.db` (the
Optuna study, which `optuna-dashboard sqlite:///.../optuna.db` opens live),
and at the end `results.csv`, `results.parquet` and `study.png`.

A trial is named `t03-lr0.0031-ft12-...` (its number and sampled values,
console.TrialNames); its training run and TensorBoard run carry the name, which
Tune keeps for a restored trial, so a study resumed with `--resume` continues
an interrupted trial from its last checkpoint, and Tune does not start again
the trials that had finished.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from deqray.config import ConfigError, Experiment
from deqray.data._fs import locate
from deqray.tracking import trial_overrides

from .study import Study, pareto_front

OPTUNA_DB = "optuna.db"
STUDY_FILE = "study.json"
RESULTS = "results"
PLOT = "study.png"
LOG_FILE = "ray.log"  # Ray's output while the study ran (console.RayOutput)

# Tune reports of a trial keep these, besides the objectives and parameters.
SUMMARY_METRICS = ["fwd_nstep", "bwd_nstep", "fwd_converged", "step", "items_per_s"]


# --------------------------------------------------------------------------- #
# the trial
# --------------------------------------------------------------------------- #


def _report_callback(objectives: dict):
    """TuneReportCallback that gives Tune every objective in every report.

    Tune aborts the whole study on a report without its metric, and Optuna
    leaves a trial RUNNING forever on a NaN. A report that lacks an
    objective (a run that diverged before its first evaluation) or carries a
    non-finite one, and every report of a diverged run, gets the worst value
    instead: the sampler learns from it and the study goes on.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            diverged = m.get("status") == "diverged"
            for key, direction in objectives.items():
                v = m.get(key)
                if diverged or not isinstance(v, (int, float)) or not math.isfinite(v):
                    m[key] = math.inf if direction == "min" else -math.inf
            # Tune's live table shows the first few metrics of a report: the
            # objectives, then the step and the forward solver's steps.
            first = [*objectives, "step", "fwd_nstep"]
            m = {**{k: m[k] for k in first if k in m}, **m}
            super().after_report(run_context, [m, *metrics[1:]], checkpoint)

    return ObjectiveReport()


def trial_function(
    params: dict, *, base: dict, objectives: dict, runs_uri: str, tracking: dict
) -> None:
    """One trial: the base config with the sampled `params`, trained by a TorchTrainer;
    `tracking`: the overrides of the study's MLflow section (deqray/tracking.py)."""
    import ray.tune

    from deqray.train.driver import trainer_for
    from deqray.train.tensorboard import TrialBoard

    ctx = ray.tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    fixed = {
        "checkpoint.storage": runs_uri,
        # the trial's name (console.TrialNames) is its run's and TensorBoard's;
        # a restored trial keeps it, and resumes its own run
        "checkpoint.name": trial_name,
        "logging.progress": False,
        **tracking,  # rank 0 logs the trial to the study's MLflow experiment
    }
    cfg = Experiment.from_dict(base, f"trial {trial_id}", {**params, **fixed})
    board = TrialBoard(hparams=dict(params), objectives=list(objectives))
    callbacks = [_report_callback(objectives)]
    trainer, *_ = trainer_for(cfg, callbacks=callbacks, verbose=False, board=board)
    trainer.fit()


# --------------------------------------------------------------------------- #
# the study
# --------------------------------------------------------------------------- #


@dataclass
class StudyResult:
    study: Study
    experiment: str  # the experiment directory (local path or URI)
    rows: list[dict]  # one per trial: params, objectives, status, reason, metrics
    front: list[int]  # indices into rows: the Pareto front, or [best] for one objective

    def best(self) -> dict | None:
        return self.rows[self.front[0]] if self.front else None

    def table(self) -> str:
        return format_table(self.study, self.rows, self.front)


def experiment_uri(
    study: Study, storage: str | None, name: str | None, resume: bool = False
) -> tuple[str, str]:
    """(experiments root, experiment name). A new study gets a new name (stem and time);
    `resume` without a name takes the latest experiment of this study under the root."""
    root = storage or study.storage or "runs"
    root = root if "://" in root else os.path.abspath(os.path.expanduser(root))
    if name:
        return root, name
    if resume:
        loc = locate(root)
        mine = [
            d
            for d in (loc.list() if loc.is_dir() else [])
            if d.startswith(study.name + "-") and loc.join(d, STUDY_FILE).exists()
        ]
        if not mine:
            raise ConfigError(f"--resume: no experiment of study {study.name!r} under {root}")
        return root, sorted(mine)[-1]  # names end in a sortable time stamp
    return root, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_tuner(
    study: Study,
    exp_root: str,
    study_name: str,
    *,
    resume: bool,
    steps_per_epoch: int | None,
    storage=None,
    show_ray: bool = True,
    log_file: str | None = None,
):
    """The Tuner of a new study (sampling into the Optuna `storage`), or the restored one.

    `show_ray`: Tune's own output (`deqray tune -v`); else the study's table and
    one line per trial event (`console.py`); `log_file` is named in failures.
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .console import TrialNames, set_output
    from .optuna_storage import StudySearch

    exp_uri = exp_root.rstrip("/") + "/" + study_name
    base = study.experiment({}).to_dict()
    trainable = ray.tune.with_parameters(
        trial_function,
        base=base,
        objectives=dict(study.objectives),
        runs_uri=exp_uri + "/runs",
        tracking=trial_overrides(study.tracking, study.name),
    )
    # Trial drivers only wait on their TorchTrainer: a sliver of a custom
    # resource, so that they hold no CPU the workers need (docs/ray-notes.md,
    # "Tune over Train").
    trainable = ray.tune.with_resources(trainable, _driver_resources())
    if resume:
        if not ray.tune.Tuner.can_restore(exp_uri):
            raise ConfigError(f"--resume: no study to resume at {exp_uri}")
        tuner = ray.tune.Tuner.restore(exp_uri, trainable=trainable, resume_errored=True)
        # Tuner.restore takes no RunConfig: this run's output settings go into the
        # restored one (docs/ray-notes.md, "Quiet terminal")
        set_output(tuner._local_tuner.get_run_config(), study, show_ray, log_file)
        return tuner, exp_uri

    metrics, modes = study.metric_names(), [study.objectives[m] for m in study.metric_names()]
    multi = len(metrics) > 1
    searcher = StudySearch(
        space=study.suggest,
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        points_to_evaluate=study.reference_points() or None,
        sampler=study.make_sampler(),
        study_name=study_name,
        storage=storage,
    )
    searcher = ConcurrencyLimiter(searcher, max_concurrent=study.concurrency)
    sched = study.scheduler
    if sched.name == "asha":
        scheduler = ASHAScheduler(
            metric=metrics[0],
            mode=modes[0],
            time_attr="training_iteration",
            grace_period=sched.grace_period,
            reduction_factor=sched.reduction_factor,
            max_t=sched.max_t
            or max(study.reports_per_trial(steps_per_epoch) or 1, sched.grace_period),
            brackets=sched.brackets,
        )
    else:
        scheduler = FIFOScheduler()
    tuner = ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=study.trials,
            # (no max_concurrent_trials: the ConcurrencyLimiter above is the limit,
            # and Tune warns on every study that it ignores the second one)
            trial_name_creator=TrialNames(list(study.space)),
            trial_dirname_creator=TrialNames(list(study.space)),
        ),
        run_config=ray.tune.RunConfig(
            name=study_name,
            storage_path=exp_root,
            failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    set_output(tuner._local_tuner.get_run_config(), study, show_ray, log_file)
    return tuner, exp_uri


# What a local Ray started for a study offers besides CPUs: the trial drivers'
# resource, so that they hold no CPU (a cluster's head provides its own).
LOCAL_RESOURCES = {"TRAIN_DRIVER": 64}


def _driver_resources() -> dict:
    """{"TRAIN_DRIVER": 0.01} where the cluster offers it, else a small CPU share."""
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("TRAIN_DRIVER", 0) > 0:
        return {"TRAIN_DRIVER": 0.01}
    return {"CPU": 0.01}


def run_study(
    study: Study,
    *,
    storage: str | None = None,
    name: str | None = None,
    resume: bool = False,
    verbose: bool = True,
    optuna_storage: str | None = None,
    show_ray: bool = False,
) -> StudyResult:
    """Run (or resume) a study; returns the trials, the front and where everything is.

    `optuna_storage`: an Optuna RDB URL for the trials (else the study's
    `optuna_storage`, else SQLite with the experiment: `optuna_storage.py`).
    `verbose`: deqray's header and summary. `show_ray` (`deqray tune -v`): Tune's
    and the workers' output on the terminal too; else they go to
    `<experiment>/ray.log` and the terminal gets the study's view (`console.py`).
    """
    from deqray.data._ray import connect
    from deqray.tasks.registry import runtime_env_for

    from .console import RayOutput
    from .dashboard import EXTRA

    exp_root, study_name = experiment_uri(study, storage, name, resume)
    exp_uri = exp_root.rstrip("/") + "/" + study_name
    meta = locate(exp_uri).join(STUDY_FILE)
    if resume:
        if not meta.exists():
            raise ConfigError(f"--resume: no study to resume at {exp_uri}")
        # the study as it started, even if its file changed since
        study = Study.from_dict(json.loads(meta.read_bytes())["study"], study.source)
    elif meta.exists():
        raise ConfigError(
            f"{exp_uri} holds a study already: pass --resume to continue it, or another --name"
        )
    trials_db = _open_trials_db(study, optuna_storage, exp_uri, study_name, resume)
    base = study.experiment({})
    connect(resources=LOCAL_RESOURCES, runtime_env=runtime_env_for(base.task) or None)
    log_path = _log_path(exp_uri)
    try:
        # to the end: the workers' last lines still arrive while the summary is written
        with RayOutput(log_path, verbose=show_ray):
            grid = _fit(study, exp_root, study_name, resume, trials_db, verbose, show_ray, log_path)
            rows = collect_rows(study, grid, exp_uri)
            result = StudyResult(study, exp_uri, rows, select(study, rows))
            write_outputs(result)
            if verbose:
                print(result.table())
                print(f"results: {exp_uri}/{RESULTS}.csv, {exp_uri}/{RESULTS}.parquet")
                print(f"plot: {exp_uri}/{PLOT}")
                if not show_ray:
                    print(f"Ray's output: {exp_uri}/{LOG_FILE}")
                print(f"deqray dashboard {exp_uri}   (optuna-dashboard: {EXTRA})")
                print(f"tensorboard --logdir {exp_uri}", flush=True)
    finally:
        if "://" in exp_uri:  # the log was written here: now to the experiment
            if not show_ray:
                locate(exp_uri).join(LOG_FILE).upload(log_path)
            os.remove(log_path)
    return result


def _log_path(exp_uri: str) -> str:
    """Where Ray's output is written while the study runs: the experiment itself when
    it is local, else a local file uploaded at the end."""
    if "://" in exp_uri:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="deqray-ray-", suffix=".log")
        os.close(fd)
        return path
    os.makedirs(exp_uri, exist_ok=True)
    return os.path.join(exp_uri, LOG_FILE)


def _fit(study, exp_root, study_name, resume, trials_db, verbose, show_ray, log_path):
    """The data planned, the Tuner built and fitted (Ray's output already routed)."""
    from deqray.train.context import plan_run

    # The data once, here: an embedded set is generated before trials race for
    # it, and epochs become steps for ASHA's max_t.
    run = plan_run(study.experiment({}))
    tuner, exp_uri = build_tuner(
        study,
        exp_root,
        study_name,
        resume=resume,
        steps_per_epoch=run.steps_per_epoch,
        storage=trials_db,
        show_ray=show_ray,
        log_file=f"{exp_root.rstrip('/')}/{study_name}/{LOG_FILE}",
    )
    meta = locate(exp_uri).join(STUDY_FILE)
    if not resume:
        meta.write_bytes(
            json.dumps(
                {"source": study.source, "study": study.to_dict(), "started": time.time()},
                indent=1,
            ).encode()
        )
    if verbose:
        print(f"[deqray] study {study_name}: {study.trials} trials, {study.concurrency} at a time")
        for line in study.space_summary():
            print(f"  {line}")
        print(f"  experiment: {exp_uri}")
        if study.tracking.mlflow.uri is not None:
            m = study.tracking.mlflow
            print(f"  mlflow: {m.uri}, experiment {m.experiment_name or study.name}")
        if not show_ray:
            print(f"  Ray's output: {log_path} (deqray tune -v: on the terminal)", flush=True)
    return tuner.fit()


def _open_trials_db(study: Study, url: str | None, exp_uri: str, study_name: str, resume: bool):
    """The study's Optuna storage, opened before Ray starts (a wrong URL costs nothing).

    A resumed study keeps the database it started with. Resuming a remote
    experiment's SQLite study first brings the experiment's copy to this
    machine; a new study refuses a database that already holds its name.
    """
    import optuna

    from .optuna_storage import cache_path, open_storage, restore_copy, shown

    if url is not None and resume and url != study.optuna_storage:
        was = shown(study.optuna_storage) if study.optuna_storage else "SQLite with the experiment"
        raise ConfigError(
            f"--optuna-storage {shown(url)}: study {study_name} keeps its trials in {was}; "
            "a resumed study keeps its database (leave --optuna-storage out)"
        )
    url = url or study.optuna_storage
    if url is None and "://" in exp_uri:
        if resume:
            if restore_copy(exp_uri, study_name) is None:
                print(f"[deqray] warning: no {OPTUNA_DB} in {exp_uri}: the sampler starts over")
        elif os.path.exists(cache_path(exp_uri, study_name)):
            # a leftover of an earlier start under this name: its trials are not this study's
            os.remove(cache_path(exp_uri, study_name))
    storage = open_storage(url, exp_uri, study_name)
    if not resume and study_name in optuna.study.get_all_study_names(storage):
        storage.engine.dispose()
        raise ConfigError(
            f"the Optuna storage {shown(storage.url)} holds a study named {study_name} already: "
            "pass --resume to continue it, or another --name"
        )
    if url is not None:
        study.optuna_storage = url  # recorded in study.json: --resume finds the database
    return storage


# --------------------------------------------------------------------------- #
# results
# --------------------------------------------------------------------------- #


def collect_rows(study: Study, grid, exp_uri: str) -> list[dict]:
    """One row per trial of a Tune ResultGrid (or ExperimentAnalysis-like results)."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        name = os.path.basename(r.path.rstrip("/")) if r.path else ""
        trial_id = m.get("trial_id") or name
        run = f"{exp_uri.rstrip('/')}/runs/{name}"
        rows.append(_row(study, trial_id, name, run, dict(r.config or {}), m, r.error, r.path))
    return rows


def _row(study, trial_id, name, run, config, m, error, path) -> dict:
    """`name`: the trial's (console.TrialNames), also its directory's; `run`: its
    training run, `<experiment>/runs/<name>`; `path`: Tune's trial directory."""
    status = m.get("status") or ("error" if error else "unknown")
    reports = m.get("training_iteration", 0)
    if status == "running":
        # the last report of a trial that ended without one saying "finished":
        # ASHA stopped it, or the study is still going
        status = "stopped early" if error is None else "error"
    row: dict[str, Any] = {"trial": name, "trial_id": trial_id, "status": status}
    row["reason"] = m.get("reason") or (str(error).splitlines()[0][:200] if error else "")
    for key in study.space:
        row[key] = config.get(key)
    for key in study.metric_names():
        v = m.get(key)
        row[key] = float(v) if isinstance(v, (int, float)) else math.nan
    for key in SUMMARY_METRICS:
        if key not in row:
            v = m.get(key)
            row[key] = float(v) if isinstance(v, (int, float)) else math.nan
    row["reports"] = reports
    row["run"] = run
    row["path"] = path or ""
    return row


def select(study: Study, rows: list[dict]) -> list[int]:
    """The Pareto front (multi-objective) or the best trial, among the trials that ran
    to the end (a trial ASHA stopped was judged on fewer steps); among those it
    stopped when none did."""
    ok = [i for i, r in enumerate(rows) if r["status"] == "finished"]
    ok = ok or [i for i, r in enumerate(rows) if r["status"] == "stopped early"]
    sub = [rows[i] for i in ok]
    if study.is_multi_objective:
        return [ok[i] for i in pareto_front(sub, dict(study.objectives))]
    key = study.metric_names()[0]
    sign = 1 if study.objectives[key] == "min" else -1
    finite = [i for i in ok if math.isfinite(rows[i][key])]
    return [min(finite, key=lambda i: sign * rows[i][key])] if finite else []


def format_table(study: Study, rows: list[dict], front: list[int]) -> str:
    objs = study.metric_names()
    params = list(study.space)
    # a split's metrics after `deqray evaluate --best` (test_ppl beside val_ppl)
    names = {k for r in rows for k in r}
    tested = sorted(
        k
        for k in names
        for o in objs
        if o.startswith("val_")
        and k.endswith("_" + o[4:])
        and k not in objs
        and not k.startswith(("val_", "train_"))
    )
    cols = ["trial", *objs, *tested, *params, "fwd_nstep", "reports", "status"]
    title = "Pareto front" if study.is_multi_objective else "best trial"
    lines = [f"{title} of {len(rows)} trials (* marks it):"]
    cells = [[_cell(r.get(c, "-")) for c in cols] for r in rows]
    widths = [
        max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)
    ]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for i, cell in enumerate(cells):
        mark = "*" if i in front else " "
        lines.append(mark + " " + "  ".join(x.ljust(w) for x, w in zip(cell, widths, strict=True)))
    for r in rows:
        if r["status"] in ("diverged", "error") and r["reason"]:
            lines.append(f"  {r['trial']}: {r['status']}: {r['reason']}")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def write_outputs(result: StudyResult) -> None:
    import pandas as pd

    exp = locate(result.experiment)
    df = pd.DataFrame(result.rows)
    df["on_front"] = [i in result.front for i in range(len(result.rows))]
    exp.join(f"{RESULTS}.csv").write_bytes(df.to_csv(index=False).encode())
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    exp.join(f"{RESULTS}.parquet").write_bytes(buf.getvalue())
    png = plot(result)
    if png is not None:
        exp.join(PLOT).write_bytes(png)


def plot(result: StudyResult) -> bytes | None:
    """Pareto front (first two objectives) or optimisation history, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study, rows = result.study, result.rows
    objs = study.metric_names()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    if study.is_multi_objective:
        x, y = objs[0], objs[1]
        for status, marker in (("finished", "o"), ("stopped early", "x")):
            pts = [r for r in rows if r["status"] == status]
            ax.scatter(
                [r[x] for r in pts],
                [r[y] for r in pts],
                marker=marker,
                label=status,
                color="tab:gray",
                alpha=0.7,
            )
        front = sorted((rows[i] for i in result.front), key=lambda r: r[x])
        ax.plot(
            [r[x] for r in front],
            [r[y] for r in front],
            "o-",
            color="tab:red",
            label="Pareto front",
        )
        ax.set_xlabel(f"{x} ({study.objectives[x]})")
        ax.set_ylabel(f"{y} ({study.objectives[y]})")
    else:
        key = objs[0]
        vals = [r[key] for r in rows]
        ax.plot(range(len(vals)), vals, "o", color="tab:gray", label="trial")
        best, run = [], math.inf if study.objectives[key] == "min" else -math.inf
        for v in vals:
            if math.isfinite(v):
                run = min(run, v) if study.objectives[key] == "min" else max(run, v)
            best.append(run)
        ax.step(range(len(vals)), best, where="post", color="tab:red", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{key} ({study.objectives[key]})")
    ax.set_title(study.name)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def load_results(experiment: str) -> StudyResult:
    """A finished or running study's trials, read from its experiment directory.

    Reads Tune's files (the newest experiment_state-*.json for each trial's
    status, its directory's params.json / result.json / error.txt) without
    starting Ray, so it works while the study runs or on another machine.
    """
    from .study import Study

    exp = locate(experiment)
    meta = exp.join(STUDY_FILE)
    if not meta.exists():
        raise ConfigError(f"{experiment}: not a deqray study (no {STUDY_FILE})")
    blob = json.loads(meta.read_bytes())
    study = Study.from_dict(blob["study"], blob.get("source") or experiment)
    states = sorted(n for n in exp.list() if n.startswith("experiment_state-"))
    trials: list[tuple[str, str, str]] = []  # (trial_id, status, directory)
    if states:
        for entry in json.loads(exp.join(states[-1]).read_bytes()).get("trial_data", []):
            t = json.loads(entry[0]) if isinstance(entry, list) else entry
            trials.append((t["trial_id"], t.get("status", ""), t.get("relative_logdir", "")))
    rows = []
    for trial_id, tune_status, logdir in trials:
        d = exp.join(logdir)
        params = _json_file(d.join("params.json")) or {}
        results = d.join("result.json")
        lines = results.read_bytes().decode().splitlines() if results.exists() else []
        last = json.loads(lines[-1]) if lines else {}
        error = _last_line(d.join("error.txt")) if tune_status == "ERROR" else None
        name = logdir.rstrip("/").rsplit("/", 1)[-1]
        run = exp.join("runs", name)
        if not run.exists() and exp.join("runs", trial_id).exists():
            run = exp.join("runs", trial_id)  # a study from before trials had names
        row = _row(study, trial_id, name, run.uri, params, last, error, d.uri)
        if tune_status in ("RUNNING", "PENDING", "PAUSED") and row["status"] in (
            "stopped early",
            "unknown",
        ):
            row["status"] = tune_status.lower()
        rows.append(row)
    from deqray.evaluate.study import read_evaluations

    tested = read_evaluations(exp.uri)  # `deqray evaluate EXPERIMENT --best` adds these
    for row in rows:
        record = tested.get(row["trial_id"], {})
        row.update({k: v for k, v in record.items() if k.startswith(f"{record['split']}_")})
    return StudyResult(study, exp.uri, rows, select(study, rows))


def _json_file(loc):
    return json.loads(loc.read_bytes()) if loc.exists() else None


def _last_line(loc) -> str | None:
    if not loc.exists():
        return "error"
    lines = [x for x in loc.read_bytes().decode(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "error"
