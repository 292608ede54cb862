"""Metrics over the workers, reduced by torchmetrics: one rank's training steps, one evaluation.

`TrainStats` holds one rank's steps between two evaluations, `EvalMetrics` one
evaluation pass: the task's torchmetrics (`Task.eval_metrics`), its plain
sums and the solver's statistics. Their `reduce()`/`compute()` is collective:
every rank calls it at the same point, and torchmetrics' `compute()` gathers
each metric's states from the ranks of torch.distributed's default group
(the one Ray Train sets up; gloo or nccl). Without a process group (`deqray
evaluate`, a test) each metric is this process's alone.

torchmetrics syncs metric by metric, so every rank must hold the same metrics
in the same order. The task's own are built from the model, the same on every
rank. Keys that only the data reveals (a task's sums, the solver's statistics:
one rank may only pretrain, another never see a batch) are first agreed on with
one `all_gather_object` of their names; a rank lacking a key takes part with
the metric's empty state (0 for sums and means, -inf for maxima).

Every aggregate is float64 and keeps NaN (deqray.tasks.metrics): a diverged
model's NaN loss or worst residual must reach every rank's report
(torchmetrics gathers the states and takes torch.max over them, which
propagates a NaN on every backend).
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from deqray.tasks.metrics import max_metric, mean_metric, sum_metric

HIST_KEEP = 4096  # per-sample values kept per histogram key


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def sync_device() -> torch.device:
    """Where metric states must be for the default group: nccl gathers CUDA tensors only."""
    import torch.distributed as dist

    if _distributed() and str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed_keys(*keysets: Iterable[str]) -> list[list[str]]:
    """Each key set's union over the ranks, sorted (this rank's own without a group)."""
    import torch.distributed as dist

    local = [sorted(keys) for keys in keysets]
    if not _distributed() or dist.get_world_size() == 1:
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [sorted({k for g in gathered for k in g[i]}) for i in range(len(local))]


def computed(metric: Any) -> float | Tensor:
    """`metric.compute()` (synced over the ranks): a float, or a CPU tensor when not scalar."""
    with warnings.catch_warnings():
        # a rank without a batch still takes part in the sync, with the metric's empty state
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
        value = metric.compute()
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 else value.detach().cpu()
    return value


def _as_number(key: str, value: Any) -> float | Tensor:
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.detach().reshape(())  # no device-to-host copy per batch
    try:
        return float(value)
    except (TypeError, ValueError):
        hint = (
            " (a tensor metric belongs in Task.eval_metrics)" if isinstance(value, Tensor) else ""
        )
        raise TypeError(f"metric {key!r} must be a number, got {value!r}{hint}") from None


class _MeanMax:
    """Running mean of each key over the calls that had it; max for keys ending in `_max`."""

    def __init__(self) -> None:
        self.sum: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.max: dict[str, float] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            v, old = float(_as_number(key, value)), self.max.get(key, -math.inf)
            if key.endswith("_max"):  # max() would drop a NaN that came second
                self.max[key] = math.nan if math.isnan(v) or math.isnan(old) else max(old, v)
            else:
                self.sum[key] = self.sum.get(key, 0.0) + v
                self.count[key] = self.count.get(key, 0) + 1


class TrainStats:
    """One rank's training steps between two evaluations."""

    def __init__(self, hist_keep: int = HIST_KEEP) -> None:
        self.hist_keep = hist_keep
        self.reset()

    def reset(self) -> None:
        self.steps, self._items = 0, 0
        self._loss = self._seconds = 0.0
        self._info = _MeanMax()
        self._hist: dict[str, Tensor] = {}

    def add(
        self,
        *,
        loss: float,
        items: int,
        seconds: float,
        info_metrics: dict[str, float],
        jac_loss: float | None = None,
        residuals: dict[str, Tensor] | None = None,
    ) -> None:
        self.steps += 1
        self._loss += float(_as_number("loss", loss))
        self._items += int(items)
        self._seconds += float(_as_number("seconds", seconds))
        # the Jacobian term may come on its own or in info.metrics(): one value a step
        extra = {} if jac_loss is None else {"jac_loss": jac_loss}
        self._info.add({**info_metrics, **extra})
        for key, values in (residuals or {}).items():
            new = values.detach().flatten().to("cpu", torch.float32)
            old = self._hist.get(key)
            # a copy: `new` may be the caller's own tensor, and a slice would keep all of it
            joined = new if old is None else torch.cat([old, new])
            self._hist[key] = joined[-self.hist_keep :].clone()

    def histograms(self) -> dict[str, Tensor]:
        """This rank's most recent per-sample values (no collectives)."""
        return dict(self._hist)

    def reduce(self) -> dict[str, float]:
        """The interval's metrics over all ranks; every rank gets the same dict.

        Means are per rank over its steps having the key, then averaged over
        the ranks having it (each rank weighs the same: a MeanMetric updated
        once by each); `_max` keys and `steps` take the maximum; `items_per_s`
        is all ranks' items over the mean of their summed step times. Only
        {"steps": 0.0} when no rank took a step.
        """
        means: dict[str, float] = {}
        if self.steps:
            means = {k: v / self._info.count[k] for k, v in self._info.sum.items()}
            means.update(train_loss=self._loss / self.steps, step_time=self._seconds / self.steps)
        mean_keys, max_keys = agreed_keys(means, self._info.max)
        device = sync_device()
        out = {k: _over_ranks(mean_metric, means.get(k), device) for k in mean_keys}
        out.update({k: _over_ranks(max_metric, self._info.max.get(k), device) for k in max_keys})
        steps = _over_ranks(max_metric, float(self.steps), device)
        stepped = _over_ranks(sum_metric, float(self.steps > 0), device)  # ranks that stepped
        items = _over_ranks(sum_metric, float(self._items), device)
        seconds = _over_ranks(sum_metric, self._seconds, device)
        if not stepped:
            return {"steps": steps}
        mean_seconds = seconds / stepped
        # a clock too coarse for the steps: "unmeasurably fast", not 0/0
        fast = math.inf if items > 0 else 0.0
        out["items_per_s"] = items / mean_seconds if mean_seconds > 0 else fast
        out["steps"] = steps
        return dict(sorted(out.items()))


def _over_ranks(make: Any, value: float | None, device: Any) -> float:
    """`value` (None: this rank has none) aggregated over the ranks by a fresh `make()`."""
    metric = make(device)
    if value is not None:
        metric.update(value)
    return computed(metric)


class EvalMetrics:
    """One evaluation pass on one rank: the task's metrics, its sums, the solver's statistics.

    `add(out)` takes one batch's `EvalOutput`: each `updates[name]` (a tuple of
    arguments, or one) goes to the `update()` of the task's metric of that
    name; each `sums[name]` (a number) is summed; the solver's `info.metrics()`
    are averaged over the batches (each weighing the same), `_max` keys
    maximised. `compute()` gives ({name: value} of the task's metrics and sums,
    {val_<key>: value} of the solver's), synced over the ranks.
    """

    def __init__(self, metrics: dict[str, Any], device: Any, task: str = "task") -> None:
        self.device = torch.device(device)
        self.task = task
        self.metrics = {k: m.to(self.device) for k, m in metrics.items()}
        self.sums: dict[str, Any] = {}
        self.solver: dict[str, Any] = {}

    def add(self, out: Any) -> None:
        for key, args in out.updates.items():
            metric = self.metrics.get(key)
            if metric is None:
                raise ValueError(self._unknown(key))
            metric.update(*(args if isinstance(args, tuple) else (args,)))
        for key, value in out.sums.items():
            if key in self.metrics:
                raise ValueError(f"{self.task}: {key!r} is both a metric and a sum; rename one")
            self._sum(key).update(_as_number(key, value))
        for key, value in (out.info.metrics() if out.info is not None else {}).items():
            self._solver(key).update(_as_number(key, value))

    def compute(self) -> tuple[dict[str, float | Tensor], dict[str, float]]:
        sum_keys, solver_keys = agreed_keys(self.sums, self.solver)
        values = {k: computed(m) for k, m in sorted(self.metrics.items())}
        values.update({k: computed(self._sum(k)) for k in sum_keys})
        solver = {"val_" + k: computed(self._solver(k)) for k in solver_keys}
        return values, solver

    def _sum(self, key: str) -> Any:
        if key not in self.sums:
            self.sums[key] = sum_metric(self.device)
        return self.sums[key]

    def _solver(self, key: str) -> Any:
        if key not in self.solver:
            make = max_metric if key.endswith("_max") else mean_metric
            self.solver[key] = make(self.device)
        return self.solver[key]

    def _unknown(self, key: str) -> str:
        names = sorted(self.metrics)
        near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return (
            f"{self.task}: EvalOutput.updates[{key!r}] names no metric of eval_metrics(){hint}; "
            f"it has {names}"
        )
