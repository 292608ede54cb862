"""deqray.train: DEQ training on Ray Train (`fit`), for any task, from one experiment config.

`fit(config, overrides, workers=..., storage=..., name=..., hooks=...)` returns
Ray's `Result`. The parts, each usable alone: `context.plan_run` (the typed
run context), `step.train_step` and `evaluation.evaluate` (plain PyTorch, no
Ray), `worker.train_loop_per_worker` (the Ray worker function), `hooks`
(instrumentation). Ray is imported when a run starts, not on `import deqray.train`.
"""

from __future__ import annotations


def fit(*args, **kwargs):
    from .driver import fit as _fit

    return _fit(*args, **kwargs)


fit.__doc__ = "Train a DEQ with Ray Train; see deqray.train.driver.fit."

__all__ = ["fit"]
