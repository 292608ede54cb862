"""Hooks: what instrumentation subscribes to in the worker loop, instead of patching it.

    class Timer(Hooks):
        def phase(self, name):          # a timed part of the loop
            ...
    fit("markov-tiny", hooks=[Timer()])  # every worker gets a copy (pickled)

Events (`on_event(name, **info)`): "start" (the worker function entered),
"model_built", "model_prepared" (DDP-wrapped), "checkpoint_found"
(`restored`: whether Ray handed one over), "restore_start", "restored"
(`step`), "data_end" (the last "data" phase found the epoch's end, not a
batch). Phases (`phase(name)`, a context manager around the part): "data"
(waiting for the next training batch), "metrics" (the solve's statistics of a step), "stats_add",
"progress_line", "evaluate", "stats_reduce", "gather" (per-rank state to rank
0), "append_metrics", "mlflow" (with tracking.mlflow), "tensorboard",
"save_state", "report" (`ray.train.report`). `on_step(step, result, metrics)`
follows every optimiser step (`step`: the steps taken; `result`: a `deqray.train.step.StepResult`;
`metrics`: its solver statistics as floats); `on_end()` comes last.

Hooks run on every rank, inside the workers: a hook that writes files
should write them under the run's directory (`on_event("start", run_uri=...)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


class Hooks:
    """The worker loop's subscriber interface; every method does nothing by default."""

    def on_event(self, name: str, **info: Any) -> None:
        pass

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def on_step(self, step: int, result: Any, metrics: dict[str, float]) -> None:
        pass

    def on_end(self) -> None:
        pass


class HookList(Hooks):
    """Several hooks as one; the first given is the outermost around a phase."""

    def __init__(self, hooks: Sequence[Hooks] = ()) -> None:
        self.hooks = list(hooks)

    def on_event(self, name: str, **info: Any) -> None:
        for h in self.hooks:
            h.on_event(name, **info)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for h in self.hooks:
                stack.enter_context(h.phase(name))
            yield

    def on_step(self, step: int, result: Any, metrics: dict[str, float]) -> None:
        for h in self.hooks:
            h.on_step(step, result, metrics)

    def on_end(self) -> None:
        for h in self.hooks:
            h.on_end()
