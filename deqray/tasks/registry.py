"""Tasks by name: the shipped ones, and a user's by import path ("package.module:Class").

A user's module is imported the way `python -m` would find it: from the
current directory (the project root) and PYTHONPATH. Ray workers on this
machine see the driver's current directory too; on a cluster the module's
top-level package travels with the job (`runtime_env_for`, Ray's
`py_modules`), and `ray job submit --working-dir .` ships it as well.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from deqray.config import ConfigError, DataSection
from deqray.core._errors import suggest

from .base import Task, missing_methods, signature_of

SHIPPED: dict[str, str] = {
    "language_model": "deqray.tasks.language_model:LanguageModel",
    "image_classification": "deqray.tasks.image_classification:ImageClassification",
    "segmentation": "deqray.tasks.segmentation:Segmentation",
}
DEFAULT = "language_model"  # what an experiment without task or model trains

_CACHE: dict[str, Task] = {}


def shipped_tasks() -> list[str]:
    return list(SHIPPED)


def load_task(name: str, where: str = "config") -> Task:
    """The task named `name` (shipped name or import path); ConfigError naming `where`."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{where}: task: expected a task name or 'package.module:Class', got {name!r}"
        )
    if name in _CACHE:
        return _CACHE[name]
    path = SHIPPED.get(name, name)
    if ":" not in path:
        raise ConfigError(
            f"{where}: task: unknown task {name!r}{suggest(name, SHIPPED)}; shipped tasks: "
            f"{', '.join(SHIPPED)}; a task of your own is named by import path "
            "('package.module:Class')"
        )
    module_name, _, attr = path.partition(":")
    module = _import(module_name, name, where)
    cls = getattr(module, attr, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if inspect.isclass(v)]
        raise ConfigError(
            f"{where}: task: module {module_name!r} has no {attr!r}{suggest(attr, names)}"
        )
    task = _instantiate(cls, name, where)
    _CACHE[name] = task
    return task


def task_for(task: Any, model: Any, where: str = "config") -> Task:
    """The experiment's task: `task` when given, else the shipped task whose models
    include `model` (a mapping naming a preset), else the default."""
    if task is not None:
        return load_task(task, where)
    for name in SHIPPED:
        candidate = load_task(name, where)
        accepts = getattr(candidate, "accepts_model", None)
        if accepts is not None and accepts(model):
            return candidate
    return load_task(DEFAULT, where)


def runtime_env_for(name: str | None) -> dict:
    """Ray runtime_env entries that ship a user task's code to every node: its top-level
    package directory as a `py_modules` entry. Empty for shipped tasks, for modules
    installed in site-packages, and for single-file modules (those travel with
    `ray job submit --working-dir`)."""
    if not name or name in SHIPPED:
        return {}
    module_name = name.partition(":")[0]
    top = sys.modules.get(module_name.split(".")[0])
    paths = list(getattr(top, "__path__", []) or [])
    if not paths:
        return {}
    root = Path(paths[0]).resolve()
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return {}
    return {"py_modules": [str(root)]}


def _import(module_name: str, name: str, where: str):
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` would: the project root first
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{where}: task: cannot import {module_name!r} for task {name!r} ({e}); "
            f"import paths are resolved from the current directory ({cwd}) and PYTHONPATH"
        ) from None
    except Exception as e:  # the user's module itself failed
        raise ConfigError(
            f"{where}: task: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from None


def _instantiate(cls: Any, name: str, where: str) -> Task:
    label = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    if not inspect.isclass(cls):
        raise ConfigError(f"{where}: task: {name!r} is not a class but {type(cls).__name__}")
    missing = missing_methods(cls)
    if not issubclass(cls, Task):
        need = ", ".join(missing) if missing else "none, but it must subclass it"
        raise ConfigError(
            f"{where}: task: {label} is not a deqray.tasks.Task subclass; "
            f"methods of the interface it lacks: {need}"
        )
    if missing:
        detail = "; ".join(signature_of(m) for m in missing)
        raise ConfigError(
            f"{where}: task: {label} does not implement the Task interface: missing "
            f"{', '.join(missing)} ({detail})"
        )
    section = getattr(cls, "data_section", None)
    if not (inspect.isclass(section) and issubclass(section, DataSection)):
        raise ConfigError(
            f"{where}: task: {label}.data_section must be a dataclass subclassing "
            f"deqray.config.DataSection, got {section!r}"
        )
    try:
        return cls()
    except Exception as e:
        raise ConfigError(
            f"{where}: task: {label}() failed: {type(e).__name__}: {e} "
            "(a task is built without arguments)"
        ) from None
