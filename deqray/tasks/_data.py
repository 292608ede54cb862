"""Data steps the shipped tasks share: embedded sets generated once, manifests, splits.

An embedded set (generated, no download) lives in one cache directory per
(source, options), generated under a file lock because the concurrent trials
of a sweep may all start by asking for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Sequence

from deqray.config import ConfigError, DataSection

Generator = Callable[..., object]  # fn(src, out, *, progress, **options) -> Manifest


def embedded_root(data: DataSection) -> str:
    """Where the embedded set of `data` lives: one directory per (source, options)."""
    cache = data.cache or os.path.join(os.path.expanduser("~"), ".cache", "deqray", "data")
    key = json.dumps(data.options, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return os.path.join(os.path.abspath(cache), f"{data.source}-{digest}")


def check_source(data: DataSection, embedded: dict[str, str], task: str) -> None:
    """A source that names another task's embedded set is a mistake worth naming."""
    from .registry import SHIPPED, load_task

    if data.source in embedded:
        return
    for other in SHIPPED:
        if other != task and data.source in getattr(load_task(other), "embedded", {}):
            mine = ", ".join(repr(k) for k in embedded) or "none"
            raise ConfigError(
                f"data.source: the embedded {data.source!r} set belongs to task {other!r}; "
                f"task {task!r} has {mine}"
            )


def load_data(data: DataSection, embedded: dict[str, str], kind: str, verbose: bool = True):
    """The manifest of the run's data; an embedded set is generated on first use.

    `embedded` maps names to "module:function" generators; `kind` is the
    manifest kind the task reads ("lm", "vision", ...).
    """
    from deqray.data import DataError, load_manifest

    if data.source not in embedded:
        try:
            manifest = load_manifest(data.source)
        except (DataError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"data.source: {e}") from None
    else:
        manifest = _generate(data, embedded[data.source], verbose)
    if manifest.kind != kind:
        raise ConfigError(
            f"data.source: {manifest.root} holds {manifest.kind!r} data; this task reads "
            f"{kind!r} data"
        )
    return manifest


def _generate(data: DataSection, target: str, verbose: bool):
    import importlib

    module, _, fn = target.partition(":")
    generate = getattr(importlib.import_module(module), fn)
    root = embedded_root(data)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return generate(None, root, progress=verbose, **data.options)
        except TypeError as e:
            raise ConfigError(f"data.options: {e}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pick_splits(manifest, data: DataSection, prefer: Sequence[str]) -> tuple[str, str]:
    """(train split, evaluation split): `data.eval_split`, else the first of `prefer`
    among the other splits, else the first other split."""
    train = data.train_split
    if train not in manifest.splits:
        raise ConfigError(
            f"data.train_split: {manifest.root} has no split {train!r}; "
            f"splits: {', '.join(manifest.splits)}"
        )
    ev = data.eval_split
    if ev is None:
        others = [s for s in manifest.splits if s != train]
        ev = next((s for s in prefer if s in others), others[0] if others else None)
    if ev not in manifest.splits:
        raise ConfigError(
            f"data.eval_split: {manifest.root} has no split {ev!r}; "
            f"splits: {', '.join(manifest.splits)}"
        )
    return train, ev
