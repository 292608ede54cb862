"""deqray: train and tune Deep Equilibrium Models at scale.

`deqray.core` is the equilibrium core in pure PyTorch; importing `deqray`
does not import Ray.
"""

__version__ = "0.1.0"


def load(run, checkpoint: str = "latest", device=None):
    """(model, config): a run's trained model in eval mode and its experiment config.

    `run`: a run directory or URI written by `deqray train` (or a trial's,
    `<experiment>/runs/<trial name>`); `checkpoint`: "latest", "best" (by the
    task's primary metric) or a checkpoint path. See `deqray.evaluate.runs`.
    """
    from deqray.evaluate.runs import load as _load

    return _load(run, checkpoint=checkpoint, device=device)
