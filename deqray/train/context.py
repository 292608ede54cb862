"""The run's context: what every worker needs, decided once on the driver from config and data."""

from __future__ import annotations

import math

from deqray.config import ConfigError, Experiment
from deqray.tasks import Batching, RunContext


def batching(cfg: Experiment) -> Batching:
    w = cfg.scaling.workers
    return Batching(
        workers=w,
        batch_per_worker=cfg.optim.batch_size // w,
        eval_batch_per_worker=(cfg.optim.eval_batch_size or cfg.optim.batch_size) // w,
    )


def plan_run(cfg: Experiment, run_uri: str = "") -> RunContext:
    """The task reads (or generates) its data and plans the epochs; the length of the run
    and its pretraining phase follow. ConfigError for data that does not fit the config."""
    task = cfg.get_task()
    b = batching(cfg)
    plan = task.plan(cfg, b)
    if plan.steps_per_epoch < 1:
        raise ConfigError(
            f"optim.batch_size: {cfg.optim.batch_size} leaves no whole step in an epoch of "
            f"the training split {plan.train_split!r}"
        )
    o = cfg.optim
    total = o.steps if o.steps is not None else math.ceil(o.epochs * plan.steps_per_epoch)
    return RunContext(
        experiment=cfg,
        task=task,
        plan=plan,
        batching=b,
        total_steps=total,
        pretrain_steps=cfg.pretrain_steps(),
        run_uri=run_uri,
    )
