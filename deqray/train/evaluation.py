"""Evaluating any task on a stream of batches: plain PyTorch, the same with or without Ray.

    metrics = evaluate(task, model, batches)   # {"val_ppl": ..., "val_fwd_nstep": ...}

The model runs unwrapped (DDP's forward would broadcast buffers, a
collective that ranks with different batch counts could not match), in eval
mode (the evaluation f_thres), without gradients. The task's torchmetrics,
its sums and the solver's statistics (deqray.train.reduce.EvalMetrics) are
synced over the ranks by torchmetrics when torch.distributed is initialised,
so every rank must call this at the same point.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from deqray.tasks import Task

from .reduce import EvalMetrics, sync_device
from .state import unwrap


def evaluate(
    task: Task,
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    sradius: bool = False,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    prefix: str = "val_",
) -> dict[str, float]:
    """The task's metrics and the solver's statistics over `batches`, keys prefixed."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    metrics = _metrics(task, net)
    state = task.state_at_epoch_start()
    try:
        with torch.no_grad(), autocast():
            for batch in batches:
                out = task.eval_step(net, batch, state, sradius=sradius)
                state = out.state
                metrics.add(out)
    finally:
        net.train(was_training)
    return _finish(task, metrics, prefix)


def evaluate_curve(
    task: Task,
    model: torch.nn.Module,
    batches: Iterable[Any],
    budgets: list[int],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    prefix: str = "val_",
) -> dict[int, dict[str, float]]:
    """{budget: metrics} from one solve per batch (a task with `curve_from_one_solve`):
    each budget's metrics are those `evaluate` gives with the model's eval budget at it."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    metrics = {k: _metrics(task, net) for k in budgets}
    state = task.state_at_epoch_start()
    try:
        with torch.no_grad(), autocast():
            for batch in batches:
                for k, out in task.eval_curve_step(net, batch, state, list(budgets)).items():
                    metrics[k].add(out)
    finally:
        net.train(was_training)
    return {k: _finish(task, metrics[k], prefix) for k in budgets}


def _metrics(task: Task, net: torch.nn.Module) -> EvalMetrics:
    # the states live where the batches' outputs are: the model's device (a model
    # without parameters or buffers: where the process group gathers)
    first = next(itertools.chain(net.parameters(), net.buffers()), None)
    device = first.device if first is not None else sync_device()
    return EvalMetrics(task.eval_metrics(net), device, task=task.name or type(task).__name__)


def _finish(task: Task, metrics: EvalMetrics, prefix: str) -> dict[str, float]:
    values, solver = metrics.compute()
    out = {prefix + k: v for k, v in task.summarize(values).items()}
    out.update({prefix + k[len("val_") :]: v for k, v in solver.items()})
    return dict(sorted(out.items()))
