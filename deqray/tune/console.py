"""What `deqray tune` shows on the terminal, and where Ray's own output goes instead.

By default the terminal gets Tune's trial table (every `TABLE_EVERY_S`
seconds), one line per trial start, end, early stop and failure, warnings,
and deqray's summary; everything Ray prints (the workers' output, Ray's INFO
logs) goes to `<experiment>/ray.log`. `deqray tune -v` puts it all back on
the terminal, with Tune's own output.

Trials are named `t03-lr0.0031-ft12-broyden`: their number in the study and
their sampled values, each shortened (`trial_label`). The name is Tune's
trial name and directory, the training run's directory under `runs/`, and so
TensorBoard's run name.

The Ray parts this relies on are listed in docs/ray-notes.md ("Quiet terminal").
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ray.tune import Callback
from ray.tune.progress_reporter import CLIReporter

TABLE_EVERY_S = 60  # Tune's trial table: a study of minutes shows it a handful of times
MAX_LABEL = 60

# Ray's knobs, set while a study runs (RayOutput): Tune's TensorBoard logger
# off (deqray's workers write one TensorBoard run per trial; Tune's would be a
# second one, of Tune's bookkeeping), and the legacy output engine, the one
# that takes a ProgressReporter (the new one ignores it) - quiet mode only.
_ALWAYS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
_QUIET = {"RAY_AIR_NEW_OUTPUT": "0"}


# --------------------------------------------------------------------------- #
# trial names
# --------------------------------------------------------------------------- #


def _abbrev(key: str) -> str:
    """`deq.f_thres` -> `ft`, `optim.lr` -> `lr`, `model.dropout` -> `dro`."""
    words = [w for w in key.rsplit(".", 1)[-1].split("_") if w]
    if len(words) == 1:
        return words[0][:3]
    return "".join(w[0] for w in words)


def _value(v) -> str:
    if isinstance(v, bool):
        return "y" if v else "n"
    if isinstance(v, float):
        return f"{v:.2g}"
    return re.sub(r"[^A-Za-z0-9.+]+", "_", str(v))


def trial_label(number: int, params: dict, keys: list[str]) -> str:
    """`t03-lr0.0031-ft12-broyden`: the number, then each sampled value in `keys` order.

    A categorical value stands alone; a number follows its key's abbreviation
    (`_abbrev`). Only the number makes a name unique, so a name cut at
    `MAX_LABEL` characters still is. Safe as a directory name everywhere.
    """
    parts = [f"t{number:02d}"]
    for key in keys:
        if key not in params:
            continue
        v = params[key]
        parts.append(_value(v) if isinstance(v, str) else _abbrev(key) + _value(v))
    return "-".join(parts)[:MAX_LABEL].rstrip("-")


@dataclass
class TrialNames:
    """TuneConfig's trial_name_creator and trial_dirname_creator (the same name).

    The number is Tune's count of the trials it created (`experiment_tag`
    starts with it, from 1), less one: the Optuna trial number, since the
    searcher asks Optuna for each trial in that order.
    """

    keys: list[str]

    def __call__(self, trial) -> str:
        number = int(str(trial.experiment_tag).split("_", 1)[0]) - 1
        return trial_label(number, dict(trial.config or {}), self.keys)


# --------------------------------------------------------------------------- #
# the terminal
# --------------------------------------------------------------------------- #


class StudyReporter(CLIReporter):
    """Tune's trial table with the study's columns, without Tune's scheduler and
    resource lines, and none at the end (deqray's summary follows)."""

    def __init__(self, objectives: list[str], params: list[str]) -> None:
        metrics = {k: k for k in objectives}
        metrics.update(training_iteration="reports", fwd_nstep="fwd_nstep")
        super().__init__(
            metric_columns=metrics,
            parameter_columns={k: k.rsplit(".", 1)[-1] for k in params},
            max_report_frequency=TABLE_EVERY_S,
            print_intermediate_tables=True,
        )

    def should_report(self, trials, done: bool = False) -> bool:
        # every TABLE_EVERY_S at most, and only when a trial started, reported or ended
        state = [
            (t.trial_id, t.status, (t.last_result or {}).get("training_iteration")) for t in trials
        ]
        if done or state == getattr(self, "_shown", None):
            return done
        if super().should_report(trials, done):
            self._shown = state
            return True
        return False

    def report(self, trials, done: bool, *sys_info: str) -> None:
        if done:
            return
        # Tune's "Result logdir" is its staging directory, not the experiment's
        lines = self._progress_str(trials, done).strip().splitlines()
        print("\n".join(x for x in lines if not x.startswith("Result logdir:")), flush=True)


def _metrics(result: dict, objectives: list[str]) -> str:
    shown = [f"{k} {result[k]:.4g}" for k in objectives if isinstance(result.get(k), (int, float))]
    return ", ".join(shown)


class TrialEvents(Callback):
    """One line per trial start, end, early stop and failure."""

    def __init__(self, objectives: list[str], log_file: str | None) -> None:
        self.objectives, self.log_file = objectives, log_file

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        print(f"[deqray] {trial} started", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        print(f"[deqray] {trial} {trial_end(trial.last_result or {}, self.objectives)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        where = trial.error_file or "its trial directory"
        if self.log_file:
            where += f"; Ray's output: {self.log_file}"
        print(f"[deqray] {trial} failed: {error_line(trial)} (full error: {where})", flush=True)


def trial_end(result: dict, objectives: list[str]) -> str:
    """`finished after 8 reports: val_ppl 9.1, ...` (or stopped early, diverged)."""
    reports = result.get("training_iteration", 0)
    status = result.get("status")
    if status == "diverged":
        return f"diverged after {reports} reports: {result.get('reason', '')}"
    # a trial's last report says "running" when the scheduler stopped it there
    how = "finished" if status in ("finished", "stopped") else "stopped early by the scheduler"
    shown = _metrics(result, objectives)
    return f"{how} after {reports} reports" + (f": {shown}" if shown else "")


def error_line(trial) -> str:
    """The last line of the trial's error (the exception itself), at most 300 characters."""
    try:
        error = trial.get_error()
    except OSError:  # the storage cannot be read now: the file is named beside
        error = None
    lines = [x.strip() for x in str(error or "").splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no error text)"


def set_output(run_config, study, show_ray: bool, log_file: str | None) -> None:
    """This invocation's output in a Tune RunConfig (a new one, or a restored study's):
    the study's table and trial lines unless `show_ray`, and Tune's CSV and JSON
    loggers named (RayOutput turns the automatic ones off, for their TensorBoard
    one; load_results reads result.json and params.json)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    objectives, params = study.metric_names(), list(study.space)
    kept = [c for c in run_config.callbacks or [] if not isinstance(c, TrialEvents)]
    for kind in (CSVLoggerCallback, JsonLoggerCallback):
        if not any(isinstance(c, kind) for c in kept):
            kept.append(kind())
    run_config.callbacks = kept + ([] if show_ray else [TrialEvents(objectives, log_file)])
    run_config.progress_reporter = None if show_ray else StudyReporter(objectives, params)


# --------------------------------------------------------------------------- #
# Ray's output
# --------------------------------------------------------------------------- #


class RayOutput:
    """While a study runs: Ray's knobs set, and in quiet mode Ray's output sent to `log_path`.

    Quiet mode: the workers' output (what `log_to_driver` brings to the
    driver, prefixed with the process as Ray prints it) and the driver's
    `ray.*` log records go to the file; `ray.*` warnings and errors still
    reach the terminal. Everything is put back as it was on exit.
    """

    def __init__(self, log_path: str | None, verbose: bool) -> None:
        self.log_path, self.verbose = log_path, verbose
        self._env: dict[str, str | None] = {}
        self._file = None
        self._handler: logging.Handler | None = None
        self._levels: list[tuple[logging.Handler, int]] = []
        self._printers: list = []  # Ray's own printer of the workers' output

    def __enter__(self) -> RayOutput:
        knobs = dict(_ALWAYS) if self.verbose else {**_ALWAYS, **_QUIET}
        for k, v in knobs.items():
            self._env[k] = os.environ.get(k)
            os.environ[k] = v
        if not self.verbose and self.log_path:
            self._to_file()
        return self

    def _to_file(self) -> None:
        from ray._private import worker as ray_worker

        self._file = open(self.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._handler = logging.StreamHandler(self._file)  # one stream: lines stay whole
        self._handler.setLevel(logging.INFO)  # Ray Data's loggers pass DEBUG records too
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        for logger in _ray_loggers():
            for h in logger.handlers:
                if not isinstance(h, logging.FileHandler):
                    self._levels.append((h, h.level))
                    h.setLevel(max(h.level, logging.WARNING))
            logger.addHandler(self._handler)
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        self._printers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", self._worker_lines)

    def _worker_lines(self, data: dict) -> None:
        """A batch of a Ray process's output lines, prefixed the way Ray prints them
        (`(RayTrainWorker pid=123)`), without its colours."""
        from ray._private.worker import filter_autoscaler_events

        name = data.get("actor_name") or data.get("task_name")
        who = f"{name} pid={data.get('pid')}" if name else str(data.get("pid"))
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its events only, as Ray prints them
            lines = list(filter_autoscaler_events(lines))
        for line in lines:
            self._file.write(f"({who}) {line}\n")

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            from ray._private import worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
            dispatcher.remove_handler("ray_print_logs")
            for printer in self._printers:
                dispatcher.add_handler("ray_print_logs", printer)
            for logger in _ray_loggers():
                if self._handler in logger.handlers:
                    logger.removeHandler(self._handler)
            for h, level in self._levels:
                h.setLevel(level)
            self._handler.close()
            self._file.close()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_loggers() -> list[logging.Logger]:
    """The `ray` logger and those below it that do not pass records up to it."""
    out = [logging.getLogger("ray")]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            name.startswith("ray.")
            and isinstance(logger, logging.Logger)
            and logger.handlers
            and not logger.propagate
        ):
            out.append(logger)
    return out
