"""Where a study's Optuna trials live: a database every node reaches, or SQLite kept with
the experiment.

* An RDB URL (`optuna_storage:` in the study file, or `--optuna-storage URL`):
  any URL Optuna takes (`postgresql+psycopg2://user@host:5432/db`,
  `mysql+pymysql://...`, `sqlite:////abs/path.db`). The sampler's history is
  in that database; a resumed study, from any machine, reads it there.
* No URL, a local experiment directory: the SQLite file `<experiment>/optuna.db`.
* No URL, the experiment on remote storage (s3://...): SQLite needs a local
  file, so the live file is in this machine's cache
  (`~/.cache/deqray/optuna/<study>-<hash of the experiment URI>.db`), and a
  consistent copy (SQLite's online backup) goes to `<experiment>/optuna.db`
  after every trial and whenever Tune saves the searcher's state, so that the
  copy always knows every trial Tune's saved state knows. `--resume`, on
  whichever machine, first brings that copy back into its own cache.

Tune pickles the searcher, and with it the storage, into the experiment
(`tuner.pkl`, `searcher-state-*.pkl`). A pickled `RDBStorage` reconnects to
the URL it was made with; for the remote-experiment SQLite that would be a
path on the machine that started the study, so `ExperimentSQLite` is pickled
by experiment URI instead and unpickles onto this machine's cached file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import tempfile
from typing import Any

from optuna.storages import RDBStorage
from ray.tune.search.optuna import OptunaSearch

from deqray.config import ConfigError
from deqray.data._fs import locate

from .runner import OPTUNA_DB
from .study import check_db_url

CACHE_ENV = "DEQRAY_OPTUNA_CACHE"  # where the live SQLite files of remote experiments go

log = logging.getLogger("deqray.tune")


def is_remote(uri: str) -> bool:
    return "://" in uri


def cache_path(exp_uri: str, study_name: str) -> str:
    """This machine's live SQLite file for a remote experiment (the same on every call)."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "deqray", "optuna")
    digest = hashlib.sha256(exp_uri.encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(os.path.expanduser(root)), f"{study_name}-{digest}.db")


class ExperimentSQLite(RDBStorage):
    """SQLite in this machine's cache for a study whose experiment is on remote storage;
    `upload_copy()` puts a consistent copy in the experiment directory."""

    def __init__(self, exp_uri: str, study_name: str) -> None:
        self.exp_uri, self.study_name = exp_uri, study_name
        path = cache_path(exp_uri, study_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        super().__init__(f"sqlite:///{path}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled by a resumed study, perhaps on another machine: its own cached file.
        path = cache_path(state["exp_uri"], state["study_name"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state["url"] = f"sqlite:///{path}"
        super().__setstate__(state)

    @property
    def path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    @property
    def copy_uri(self) -> str:
        return self.exp_uri.rstrip("/") + "/" + OPTUNA_DB

    def upload_copy(self) -> bool:
        """Copy the live file to the experiment directory; False (and a warning) if the
        storage refused: the live file is intact and the next copy tries again."""
        with tempfile.TemporaryDirectory(prefix="deqray-optuna-") as tmp:
            snapshot = os.path.join(tmp, OPTUNA_DB)
            backup(self.path, snapshot)
            try:
                locate(self.copy_uri).upload(snapshot)
            except OSError as e:
                log.warning("the study's copy %s was not updated (%s)", self.copy_uri, e)
                return False
        return True


def backup(src: str, dst: str) -> None:
    """A consistent copy of a live SQLite database (SQLite's online backup)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def restore_copy(exp_uri: str, study_name: str) -> str | None:
    """Bring the experiment's copy into this machine's cache (replacing what is there);
    the cached path, or None when the experiment has no copy yet."""
    copy = locate(exp_uri.rstrip("/") + "/" + OPTUNA_DB)
    if not copy.exists():
        return None
    path = cache_path(exp_uri, study_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part"
    with open(tmp, "wb") as fh:
        fh.write(copy.read_bytes())
    os.replace(tmp, path)
    return path


def shown(url: str) -> str:
    """The URL with its password masked, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str | None, exp_uri: str, study_name: str) -> RDBStorage:
    """The study's Optuna storage (see the module doc); ConfigError naming the URL when the
    database driver is missing or the database cannot be reached."""
    if url is None:
        if is_remote(exp_uri):
            return ExperimentSQLite(exp_uri, study_name)
        os.makedirs(exp_uri, exist_ok=True)
        return RDBStorage(f"sqlite:///{os.path.join(exp_uri, OPTUNA_DB)}")
    check_db_url(url, "--optuna-storage")
    # a study runs for hours: connections a server dropped meanwhile are replaced
    kwargs = {} if url.startswith("sqlite") else {"pool_pre_ping": True}
    from sqlalchemy.exc import NoSuchModuleError

    try:
        return RDBStorage(url, engine_kwargs=kwargs)
    except (ImportError, NoSuchModuleError) as e:
        raise ConfigError(
            f"optuna_storage {shown(url)}: its database driver is not installed or unknown "
            f"({e.__cause__ or e}; for PostgreSQL: pip install psycopg2-binary)"
        ) from None
    except Exception as e:  # sqlalchemy's OperationalError and the like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"optuna_storage {shown(url)}: cannot open the database ({first})"
        ) from None


class StudySearch(OptunaSearch):
    """OptunaSearch that keeps the experiment's copy of a remote experiment's SQLite study
    up to date: after every trial, and with every save of the searcher's state."""

    def _upload(self) -> None:
        if isinstance(self._storage, ExperimentSQLite):
            self._storage.upload_copy()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        super().on_trial_complete(trial_id, result=result, error=error)
        self._upload()

    def save(self, checkpoint_path: str) -> None:
        self._upload()
        super().save(checkpoint_path)
