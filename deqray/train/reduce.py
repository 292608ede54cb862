"""Metrics reduced over the workers: one rank's training steps, one evaluation pass.

`TrainStats` holds one rank's steps between two evaluations, `EvalSums` one
evaluation pass (the task's sums and the solver's statistics). Every rank
must call `reduce()` at the same point, like any collective. Ranks may hold
different keys (one rank only pretrained, another never computed the
Jacobian loss), so a reduction first exchanges the key names (and tensor
shapes) with one `all_gather_object`, then packs the values in the sorted
union order into one float64 tensor all-reduced with SUM and one with MAX; a
key a rank lacks counts 0 there (-inf for MAX), so it is averaged over the
ranks having it. Tensors (a confusion matrix) are summed elementwise, a rank
without one adding zeros of the shape the others agree on.

`reduce_fn`: None uses torch.distributed's default group when it is initialized
with world size > 1, else this rank's values alone. Any object with
`world_size`, `all_gather_object(obj) -> list` and `all_reduce(tensor, op) ->
tensor` (op "sum" or "max") can stand in for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

HIST_KEEP = 4096  # per-sample values kept per histogram key
_N = "#n:"  # internal keys start with "#"; this one counts the values of a mean key


class TorchCollective:
    """torch.distributed's default group; with `local=True`, this rank's values alone."""

    def __init__(self, local: bool = False) -> None:
        import torch.distributed as dist

        self._dist = None if local else dist
        self.world_size = 1 if local else dist.get_world_size()
        # nccl reduces CUDA tensors only; gloo (and "cpu:gloo,cuda:nccl") takes CPU ones
        nccl = not local and str(dist.get_backend()) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [obj] * self.world_size
        if self._dist is not None:
            self._dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        if self._dist is None:
            return tensor
        t = tensor.to(self.device)
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX}
        self._dist.all_reduce(t, op=ops[op])
        return t.cpu()


def collective(reduce_fn: Any = None) -> Any:
    if reduce_fn is not None:
        return reduce_fn
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return TorchCollective(local=not on)


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {value!r}") from None


def _all_reduce(sums: dict, maxes: dict, coll: Any, tensors: dict[str, Tensor] | None = None):
    """(sums, maxima, tensors) over all ranks, keys the union; `tensors` are summed
    elementwise, a rank without one adding zeros of the shape the others agree on."""
    tensors = tensors or {}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    gathered = coll.all_gather_object((sorted(sums), sorted(maxes), shapes))
    sum_keys = sorted({k for g in gathered for k in g[0]})
    max_keys = sorted({k for g in gathered for k in g[1]})
    agreed: dict[str, tuple] = {}
    for g in gathered:
        for k, shape in g[2].items():
            if agreed.setdefault(k, shape) != shape:
                raise ValueError(
                    f"ranks disagree on the shape of summed tensor {k!r}: {agreed[k]} vs {shape}"
                )
    tensor_keys = sorted(agreed)
    # MAX over a NaN is backend-defined, and a NaN worst residual must reach
    # every rank's divergence check: NaN counts travel with the sums
    nans = [float(math.isnan(maxes.get(k, 0.0))) for k in max_keys]
    parts = [torch.tensor([sums.get(k, 0.0) for k in sum_keys] + nans, dtype=torch.float64)]
    for k in tensor_keys:
        t = tensors.get(k)
        t = torch.zeros(agreed[k]) if t is None else t.detach().cpu()
        parts.append(t.double().flatten())
    sum_t = torch.cat(parts)
    max_v = [maxes.get(k, -math.inf) for k in max_keys]
    max_t = torch.tensor([-math.inf if math.isnan(v) else v for v in max_v], dtype=torch.float64)
    # the layout is agreed on, so every rank skips (or calls) the same collectives
    if sum_t.numel():
        sum_t = coll.all_reduce(sum_t, "sum")
    if max_t.numel():
        max_t = coll.all_reduce(max_t, "max")
    ns, nm = len(sum_keys), len(max_keys)
    s = sum_t[: ns + nm].tolist()
    out_max = zip(max_keys, max_t.tolist(), s[ns : ns + nm], strict=True)
    out_t, at = {}, ns + nm
    for k in tensor_keys:
        n = math.prod(agreed[k])
        out_t[k] = sum_t[at : at + n].reshape(agreed[k])
        at += n
    return (
        dict(zip(sum_keys, s[:ns], strict=True)),
        {k: math.nan if n else v for k, v, n in out_max},
        out_t,
    )


class _MeanMax:
    """Running mean of each key over the calls that had it; max for keys ending in `_max`."""

    def __init__(self) -> None:
        self.sum: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.max: dict[str, float] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            v, old = _as_float(key, value), self.max.get(key, -math.inf)
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
        self._loss += _as_float("loss", loss)
        self._items += int(items)
        self._seconds += _as_float("seconds", seconds)
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

    def reduce(self, reduce_fn: Any = None) -> dict[str, float]:
        """The interval's metrics over all ranks; every rank gets the same dict.

        Means are per rank over its steps having the key, then averaged over
        the ranks having it (each rank weighs the same); `_max` keys and `steps`
        take the maximum; `items_per_s` is all ranks' items over the mean of
        their summed step times. Only {"steps": 0.0} when no rank took a step.
        """
        sums: dict[str, float] = {}
        if self.steps:
            means = {k: v / self._info.count[k] for k, v in self._info.sum.items()}
            means.update(train_loss=self._loss / self.steps, step_time=self._seconds / self.steps)
            for k, v in means.items():
                sums[k], sums[_N + k] = v, 1.0
            sums.update({"#items": self._items, "#seconds": self._seconds, "#ranks": 1.0})
        s, m, _ = _all_reduce(sums, {**self._info.max, "#steps": self.steps}, collective(reduce_fn))
        out = {"steps": m.pop("#steps")}
        if not s.get("#ranks"):
            return out
        out.update({k: v / s[_N + k] for k, v in s.items() if not k.startswith("#")}, **m)
        mean_seconds, items = s["#seconds"] / s["#ranks"], s["#items"]
        # a clock too coarse for the steps: "unmeasurably fast", not 0/0
        fast = math.inf if items > 0 else 0.0
        out["items_per_s"] = items / mean_seconds if mean_seconds > 0 else fast
        return dict(sorted(out.items()))


class EvalSums:
    """One evaluation pass on one rank: the task's sums and the solver's statistics.

    `reduce()` gives (the task's sums over every batch and rank, the solver's
    statistics as val_<key>: the mean over batches, each batch weighing the
    same, and the maximum for `_max` keys).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tensors: dict[str, Tensor] = {}
        self._solver = _MeanMax()
        self.batches = 0

    def add(self, sums: dict[str, Any], info_metrics: dict[str, float] | None = None) -> None:
        self.batches += 1
        for key, value in sums.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                v = value.detach().cpu().double()
                old = self.tensors.get(key)
                self.tensors[key] = v if old is None else old + v
            else:
                self.sums[key] = self.sums.get(key, 0.0) + _as_float(key, value)
        if info_metrics:
            self._solver.add(info_metrics)

    def reduce(self, reduce_fn: Any = None) -> tuple[dict[str, Any], dict[str, float]]:
        sums = {"task:" + k: v for k, v in self.sums.items()}
        sums.update({"solver:" + k: v for k, v in self._solver.sum.items()})
        sums.update({_N + k: float(n) for k, n in self._solver.count.items()})
        s, m, t = _all_reduce(sums, self._solver.max, collective(reduce_fn), self.tensors)
        task = {k[5:]: v for k, v in s.items() if k.startswith("task:")}
        task.update(t)
        solver = {"val_" + k: v for k, v in m.items()}
        solver.update(
            {"val_" + k[7:]: v / s[_N + k[7:]] for k, v in s.items() if k.startswith("solver:")}
        )
        return task, dict(sorted(solver.items()))
