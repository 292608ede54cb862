"""A trained run on a whole split: the task's metrics and the solver's, at one or more budgets.

    ev = evaluate_run("runs/markov-tiny-...", split="test", budgets=[2, 4, 8, 16])
    ev.points[0].metrics["test_ppl"], ev.points[0].metrics["test_fwd_nstep"]

Each point is the whole split at that forward budget (the DEQ's eval
f_thres), in one process, without Ray Train: the task's `split_batches` (a
language model's lanes in stream order with their segment memory, images
with the evaluation transform) through the same `evaluate` the training loop
calls. Where the task can (`curve_from_one_solve`: classification and
segmentation), one solve per batch at the largest budget gives every point
from its snapshots, each equal to a separate evaluation at its budget. A
language model's memory at each segment depends on the equilibrium states
the budget produced, so its points cannot share a solve: each costs one pass
over the split (and so does a curve with --sradius).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from deqray.config import ConfigError, parse_overrides

from .runs import EvaluateError, build_model, read_checkpoint, resolve_checkpoint, run_uri


@dataclass
class Point:
    f_thres: int | None  # the forward budget (None: the run's own evaluation budget)
    metrics: dict[str, float]  # "<split>_<name>" for the task's and the solver's metrics
    seconds: float
    batches: int


@dataclass
class Evaluation:
    run: str
    checkpoint: str
    step: int | None
    split: str
    task: str
    primary: str  # the report key of the primary metric ("test_ppl")
    direction: str | None
    points: list[Point] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_run(
    run: str,
    *,
    checkpoint: str = "latest",
    split: str = "test",
    budgets: list[int] | None = None,
    batch_size: int | None = None,
    overrides: list[str] | dict | None = None,
    sradius: bool = False,
    device: Any = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a run's checkpoint on a whole split, once per forward budget."""
    import torch

    from deqray.train.context import plan_run
    from deqray.train.report import task_metrics

    for k in budgets or []:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise EvaluateError(f"--f-thres: budgets are whole numbers >= 1, got {k!r}")
    ckpt = resolve_checkpoint(run, checkpoint)
    state, cfg = read_checkpoint(ckpt)
    extra = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else overrides
    model_changes = {
        k[len("model.") :]: v for k, v in (extra or {}).items() if k.startswith("model.")
    }
    model = build_model(state, cfg, ckpt.uri, model_changes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    cfg = _for_evaluation(cfg, split, batch_size, sradius, extra)
    try:
        plan = plan_run(cfg)
    except ConfigError as e:
        raise EvaluateError(_explain(str(e), split)) from None
    primary = task_metrics(cfg)[0]
    ev = Evaluation(
        run=run_uri(run),
        checkpoint=ckpt.uri,
        step=int(state["progress"]["step"]),
        split=split,
        task=plan.task.name,
        primary=f"{split}_{primary.name[len('val_') :]}",
        direction=primary.direction,
    )
    one_solve = plan.task.curve_from_one_solve and budgets and len(budgets) > 1 and not sradius
    if one_solve:  # the snapshots of one solve at the largest budget give every point
        ev.points = _curve(plan, model, split, budgets, device, progress)
    else:
        ev.points = [
            _point(plan, model, split, k, sradius, device, progress) for k in budgets or [None]
        ]
    return ev


def _point(plan, model, split, k, sradius, device, progress) -> Point:
    from deqray.train.evaluation import evaluate

    if k is not None:
        set_eval_budget(model, k)
    t0 = time.perf_counter()
    total = plan.task.count_batches(plan, split)
    counter = Progress(total, f"f_thres {k}" if k else split, enabled=progress)
    batches = counter.wrap(plan.task.split_batches(plan, split, device))
    metrics = evaluate(plan.task, model, batches, sradius=sradius, prefix=f"{split}_")
    counter.done()
    return Point(k, metrics, time.perf_counter() - t0, counter.count)


def _curve(plan, model, split, budgets, device, progress) -> list[Point]:
    """Every budget's point from one pass: the seconds are the pass's (shared)."""
    from deqray.train.evaluation import evaluate_curve

    set_eval_budget(model, max(budgets))
    t0 = time.perf_counter()
    total = plan.task.count_batches(plan, split)
    counter = Progress(total, f"f_thres {','.join(map(str, budgets))}", enabled=progress)
    batches = counter.wrap(plan.task.split_batches(plan, split, device))
    by_budget = evaluate_curve(plan.task, model, batches, budgets, prefix=f"{split}_")
    counter.done()
    seconds = time.perf_counter() - t0
    return [Point(k, by_budget[k], seconds, counter.count) for k in budgets]


def set_eval_budget(model, f_thres: int) -> None:
    """Every DEQ in `model` evaluates with `f_thres` forward iterations."""
    from deqray.core import DEQ

    found = False
    for m in model.modules():
        if isinstance(m, DEQ):
            m.config = dataclasses.replace(m.config, eval_f_thres=f_thres)
            found = True
    if not found:
        raise EvaluateError("--f-thres: the model has no deqray.core.DEQ module to set it on")


def _for_evaluation(cfg, split: str, batch_size: int | None, sradius: bool, extra: dict | None):
    eval_batch = batch_size or cfg.optim.eval_batch_size or cfg.optim.batch_size
    if not isinstance(eval_batch, int) or eval_batch < 1:
        raise EvaluateError(f"--batch-size: expected a whole number >= 1, got {batch_size!r}")
    # one process, the whole split, the split as the evaluation split
    fixed = {
        "scaling.workers": 1,
        "optim.eval_batch_size": eval_batch,
        "train.eval_batches": None,
        "train.eval_sradius": sradius,
        "data.eval_split": split,
        "logging.progress": False,
    }
    return cfg.with_overrides({**fixed, **(extra or {})}, where="deqray evaluate")


def _explain(message: str, split: str) -> str:
    if "data.eval_split" in message:
        return message.replace("data.eval_split", f"--split {split}", 1)
    if "data.source: " in message:
        return (
            f"{message} (the run's data is not where it was: pass data.source=<where it is "
            "now> as an override)"
        )
    return message


class Progress:
    """Batches done, rate and time left on stderr, at most every few seconds."""

    def __init__(self, total: int | None, label: str, enabled: bool = True, every: float = 5.0):
        self.total, self.label, self.enabled, self.every = total, label, enabled, every
        self.count = self.shown = 0
        self.t0 = self.last = time.perf_counter()

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            yield batch
            self.count += 1
            now = time.perf_counter()
            if self.enabled and now - self.last >= self.every:
                self.last = now
                self._line(now)

    def _line(self, now: float) -> None:
        self.shown = self.count
        rate = self.count / max(now - self.t0, 1e-9)
        text = f"[deqray] evaluate {self.label}: {self.count}"
        if self.total:
            left = max(self.total - self.count, 0) / max(rate, 1e-9)
            text += f"/{self.total} batches, {rate:.2f}/s, {left:.0f} s left"
        else:
            text += f" batches, {rate:.2f}/s"
        print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.shown != self.count:
            self._line(time.perf_counter())
