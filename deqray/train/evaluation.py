"""Evaluating any task on a stream of batches: plain PyTorch, the same with or without Ray.

    metrics = evaluate(task, model, batches)   # {"val_ppl": ..., "val_fwd_nstep": ...}

The model runs unwrapped (DDP's forward would broadcast buffers, a
collective that ranks with different batch counts could not match), in eval
mode (the evaluation f_thres), without gradients. The task's sums and the
solver's statistics are reduced over the ranks when torch.distributed is
initialised, so every rank must call this at the same point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from deqray.tasks import Task

from .reduce import EvalSums
from .state import unwrap


def evaluate(
    task: Task,
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    sradius: bool = False,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    prefix: str = "val_",
    reduce_fn: Any = None,
) -> dict[str, float]:
    """The task's metrics and the solver's statistics over `batches`, keys prefixed."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    sums = EvalSums()
    state = task.state_at_epoch_start()
    try:
        with torch.no_grad(), autocast():
            for batch in batches:
                out = task.eval_step(net, batch, state, sradius=sradius)
                state = out.state
                sums.add(out.sums, out.info.metrics() if out.info is not None else None)
    finally:
        net.train(was_training)
    return _finish(task, sums, prefix, reduce_fn)


def evaluate_curve(
    task: Task,
    model: torch.nn.Module,
    batches: Iterable[Any],
    budgets: list[int],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    prefix: str = "val_",
    reduce_fn: Any = None,
) -> dict[int, dict[str, float]]:
    """{budget: metrics} from one solve per batch (a task with `curve_from_one_solve`):
    each budget's metrics are those `evaluate` gives with the model's eval budget at it."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    sums = {k: EvalSums() for k in budgets}
    state = task.state_at_epoch_start()
    try:
        with torch.no_grad(), autocast():
            for batch in batches:
                for k, out in task.eval_curve_step(net, batch, state, list(budgets)).items():
                    sums[k].add(out.sums, out.info.metrics() if out.info is not None else None)
    finally:
        net.train(was_training)
    return {k: _finish(task, sums[k], prefix, reduce_fn) for k in budgets}


def _finish(task: Task, sums: EvalSums, prefix: str, reduce_fn: Any) -> dict[str, float]:
    totals, solver = sums.reduce(reduce_fn)
    out = {prefix + k: v for k, v in task.summarize(totals).items()}
    out.update({prefix + k[len("val_") :]: v for k, v in solver.items()})
    return dict(sorted(out.items()))
