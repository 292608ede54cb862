"""deqray.train: DEQ training on Ray Train (`fit`), from one experiment config.

`fit(config, overrides, workers=..., storage=..., name=...)` returns Ray's
`Result`; the worker loop is `deqray.train.loop.train_loop_per_worker`.
Ray is imported when a run starts, not on `import deqray.train`.
"""

from __future__ import annotations


def fit(*args, **kwargs):
    from .driver import fit as _fit

    return _fit(*args, **kwargs)


fit.__doc__ = "Train a DEQ with Ray Train; see deqray.train.driver.fit."

__all__ = ["fit"]
