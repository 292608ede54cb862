"""`deqray dashboard EXPERIMENT`: optuna-dashboard on a study's trials, served on this machine.

    deqray dashboard runs/quickstart-20261202-101500            # http://127.0.0.1:8080
    deqray dashboard s3://bucket/tune/deq_wt103 --port 8081

The trials' database is the one the study was started with (its
`study.json` records it): an RDB URL (PostgreSQL, ...) is served as it is,
live; a local experiment's `optuna.db` likewise. A study on remote storage
kept in SQLite has its copy in the experiment directory (updated after every
trial, tune/optuna_storage.py): that copy is downloaded into a temporary file
and served as of then, so the live file of a study still running on this
machine is never touched.

optuna-dashboard is an optional dependency: `pip install "deqray[dashboard]"`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from deqray.config import ConfigError
from deqray.data._fs import locate

from .runner import OPTUNA_DB, STUDY_FILE

EXTRA = 'pip install "deqray[dashboard]"'


@contextmanager
def study_storage(experiment: str) -> Iterator[str]:
    """The storage URL optuna-dashboard should open for `experiment` (see the module doc)."""
    exp = locate(experiment)
    meta = exp.join(STUDY_FILE)
    if not meta.exists():
        raise ConfigError(f"{experiment}: no {STUDY_FILE}: not an experiment of deqray tune")
    try:
        recorded = json.loads(meta.read_bytes())["study"].get("optuna_storage")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta}: not a study record ({e})") from None
    if recorded:
        yield recorded
        return
    db = exp.join(OPTUNA_DB)
    if not db.exists():
        raise ConfigError(f"{experiment}: no {OPTUNA_DB} (the study has not recorded a trial yet)")
    if "://" not in experiment:
        yield f"sqlite:///{os.path.abspath(db.path)}"
        return
    with tempfile.TemporaryDirectory(prefix="deqray-dashboard-") as tmp:
        path = os.path.join(tmp, OPTUNA_DB)
        with open(path, "wb") as fh:
            fh.write(db.read_bytes())
        yield f"sqlite:///{path}"


def serve(experiment: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the dashboard until interrupted; ConfigError for a missing extra or experiment."""
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError(f"optuna-dashboard is not installed: {EXTRA}") from None
    with study_storage(experiment) as url:
        from .optuna_storage import shown

        print(f"[deqray] optuna-dashboard on {shown(url)}: http://{host}:{port}", flush=True)
        optuna_dashboard.run_server(url, host=host, port=port)
