"""Metrics of a training run: per-rank accumulators reduced over the workers, and
rank 0's TensorBoard writer.

`TrainStats` holds one rank's steps between two evaluations, `EvalStats` one
evaluation pass. Every rank must call `reduce()` at the same point, like any
collective. Ranks may hold different keys (one rank only pretrained, another
never computed the Jacobian loss), so a reduction first exchanges the key names
with one `all_gather_object`, then packs the values in the sorted union order
into one float64 tensor all-reduced with SUM and one with MAX; a key a rank
lacks counts 0 there (-inf for MAX), so it is averaged over the ranks having it.

`reduce_fn`: None uses torch.distributed's default group when it is initialized
with world size > 1, else this rank's values alone. Any object with
`world_size`, `all_gather_object(obj) -> list` and `all_reduce(tensor, op) ->
tensor` (op "sum" or "max") can stand in for it.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import Tensor

from deqray.data._fs import locate

log = logging.getLogger(__name__)

HIST_KEEP = 4096  # per-sample values kept per histogram key
_EXP_OVERFLOW = 700.0  # exp(709.8) overflows a float64
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


def _all_reduce(sums: dict, maxes: dict, coll: Any, extra: Tensor | None = None):
    """(sums, maxima, extra) over all ranks, keys the union; `extra` is summed elementwise,
    a rank without it adding zeros of the shape the others agree on."""
    shape = tuple(extra.shape) if extra is not None else None
    gathered = coll.all_gather_object((sorted(sums), sorted(maxes), shape))
    sum_keys = sorted({k for g in gathered for k in g[0]})
    max_keys = sorted({k for g in gathered for k in g[1]})
    shapes = {g[2] for g in gathered if g[2] is not None}
    if len(shapes) > 1:
        raise ValueError(f"ranks disagree on the shape of a summed tensor: {sorted(shapes)}")
    shape = shapes.pop() if shapes else None
    # MAX over a NaN is backend-defined, and a NaN worst residual must reach
    # every rank's divergence check: NaN counts travel with the sums
    nans = [float(math.isnan(maxes.get(k, 0.0))) for k in max_keys]
    sum_t = torch.tensor([sums.get(k, 0.0) for k in sum_keys] + nans, dtype=torch.float64)
    if shape is not None:
        ext = extra if extra is not None else torch.zeros(shape)
        sum_t = torch.cat([sum_t, ext.detach().cpu().double().flatten()])
    max_v = [maxes.get(k, -math.inf) for k in max_keys]
    max_t = torch.tensor([-math.inf if math.isnan(v) else v for v in max_v], dtype=torch.float64)
    # the layout is agreed on, so every rank skips (or calls) the same collectives
    if sum_t.numel():
        sum_t = coll.all_reduce(sum_t, "sum")
    if max_t.numel():
        max_t = coll.all_reduce(max_t, "max")
    ns, nm = len(sum_keys), len(max_keys)
    s = sum_t.tolist()
    nan_counts = s[ns : ns + nm]
    out_max = zip(max_keys, max_t.tolist(), nan_counts, strict=True)
    return (
        dict(zip(sum_keys, s[:ns], strict=True)),
        {k: math.nan if n else v for k, v, n in out_max},
        sum_t[ns + nm :].reshape(shape) if shape is not None else None,
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


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """C x C int64 counts, rows = target class, columns = predicted class.

    Pixels whose target is `ignore_index` are left out; any other class outside
    [0, C) is an error, since a wrong `num_classes` would silently skew mIoU.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    keep = target.flatten() != ignore_index
    pred, target = pred.flatten().long()[keep], target.flatten().long()[keep]
    for name, t in (("target", target), ("pred", pred)):
        bad = (t < 0) | (t >= num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"{name} has class {int(t[bad][0])} outside [0, {num_classes}) "
                f"(ignore_index={ignore_index})"
            )
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def miou(conf: Tensor) -> float:
    """Mean of TP / (TP + FP + FN) over the classes in the target or the prediction.

    A class absent from both has no IoU (0/0), neither a perfect nor a zero
    one, so it is left out; NaN when no class is present.
    """
    conf = conf.double()
    tp = conf.diagonal()
    denom = conf.sum(0) + conf.sum(1) - tp
    present = denom > 0
    return float((tp[present] / denom[present]).mean()) if bool(present.any()) else math.nan


class EvalStats:
    """One evaluation pass on one rank; `reduce()` sums over ranks (each batch weighs the same).

    Reports val_loss (per token / image / valid pixel) and val_tokens | val_images
    | val_pixels, plus val_ppl (lm), val_acc and val_top5 when C >= 5
    (classification), val_pixel_acc and val_miou (segmentation), and the mean
    (max for `_max` keys) of every `add_solver` key as val_<key>. A metric
    without data (no token at all, say) is left out rather than NaN.
    """

    TASKS = {"lm": "tokens", "classification": "images", "segmentation": "pixels"}

    def __init__(self, task: str, num_classes: int | None = None, ignore_index: int = 255):
        if task not in self.TASKS:
            raise ValueError(f"EvalStats: task must be one of {list(self.TASKS)}, got {task!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"EvalStats: num_classes must be >= 1, got {num_classes}")
        self.task, self.num_classes, self.ignore_index = task, num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._solver = _MeanMax()
        self._conf: Tensor | None = None
        self.confusion: Tensor | None = None  # summed over ranks by the last reduce()

    def _add(self, task: str, **counts: Any) -> None:
        if self.task != task:
            raise ValueError(f"add_{task} called on an EvalStats for task {self.task!r}")
        for k, v in counts.items():
            self._sums["#" + k] = self._sums.get("#" + k, 0.0) + float(v)

    def _check(self, logits: Tensor, labels: Tensor, dims: str) -> int:
        if logits.dim() != len(dims) or labels.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"{self.task}: want logits ({', '.join(dims)}) and labels of that shape "
                f"without C, got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        c = logits.shape[1]
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise ValueError(f"logits have {c} classes, expected num_classes={self.num_classes}")
        return c

    def add_lm(self, nll_sum: float, tokens: int) -> None:
        self._add("lm", loss=nll_sum, n=tokens)

    def add_classification(self, logits: Tensor, labels: Tensor, loss_sum: float) -> None:
        c = self._check(logits, labels, "BC")
        logits, labels = logits.detach(), labels.detach()
        hit1 = (logits.argmax(1) == labels).sum()
        self._add("classification", loss=loss_sum, n=labels.numel(), top1=hit1)
        if c >= 5:
            hit5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()
            self._add("classification", top5=hit5, top5_n=labels.numel())

    def add_segmentation(self, logits: Tensor, labels: Tensor, loss_sum: float, pixels: int):
        c = self._check(logits, labels, "BCHW")
        self._add("segmentation", loss=loss_sum, n=pixels)
        conf = confusion_matrix(logits.detach().argmax(1), labels, c, self.ignore_index).cpu()
        self._conf = conf if self._conf is None else self._conf + conf

    def add_solver(self, info_metrics: dict[str, float]) -> None:
        self._solver.add(info_metrics)

    def reduce(self, reduce_fn: Any = None) -> dict[str, float]:
        sums = dict(self._sums)  # solver values as sums and counts: each batch weighs the same
        sums.update({"val_" + k: v for k, v in self._solver.sum.items()})
        sums.update({_N + k: float(n) for k, n in self._solver.count.items()})
        s, m, conf = _all_reduce(sums, self._solver.max, collective(reduce_fn), self._conf)
        out = {"val_" + k: v for k, v in m.items()}
        out.update({k: v / s[_N + k[4:]] for k, v in s.items() if k.startswith("val_")})
        n = s.get("#n", 0.0)
        out["val_" + self.TASKS[self.task]] = n
        if n > 0:
            out["val_loss"] = s["#loss"] / n
        if self.task == "lm" and n > 0:
            vl = out["val_loss"]
            out["val_ppl"] = math.inf if vl > _EXP_OVERFLOW else math.exp(vl)
        elif self.task == "classification" and n > 0:
            out["val_acc"] = s["#top1"] / n
            if s.get("#top5_n"):
                out["val_top5"] = s["#top5"] / s["#top5_n"]
        elif self.task == "segmentation" and conf is not None:
            self.confusion = conf = conf.round().long()
            total = int(conf.sum())
            out["val_pixel_acc"] = float(conf.diagonal().sum()) / total if total else math.nan
            out["val_miou"] = miou(conf)
        return dict(sorted(out.items()))


# TensorBoard folds tags by the part before "/": related curves sit together, and
# the solver curves of training and evaluation (val_ prefix kept) share a section.
_SOLVER = ("fwd_", "bwd_", "val_fwd_", "val_bwd_")
_JACOBIAN = ("jac", "sradius", "val_jac", "val_sradius")
_OPTIM = ("lr", "grad_norm")
_PERF = ("step_time", "items_per_s", "tokens_per_s", "images_per_s", "steps")
_STRIPPED = ("train_", "val_", "optim_", "perf_")


def tag_for(key: str, prefix_map: dict[str, str] | None = None) -> str:
    """TensorBoard tag of a metric key, first match wins.

    `prefix_map` {key prefix: group} (longest first), stripping the prefix:
    {"eval2_": "eval2"} sends eval2_loss to eval2/loss. Then: a key holding "/"
    is kept; [val_]fwd_*, [val_]bwd_* -> solver/<key>; [val_]jac*, [val_]sradius*
    -> jacobian/<key>; lr, grad_norm -> optim/<key>; step_time, items_per_s,
    tokens_per_s, images_per_s, steps -> perf/<key>; train_x, val_x, optim_x,
    perf_x -> train/x, val/x, optim/x, perf/x; anything else -> other/<key>.
    """
    for prefix, group in sorted((prefix_map or {}).items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            return f"{group}/{key[len(prefix) :] or key}"
    if "/" in key:
        return key
    if key.startswith(_SOLVER):
        return f"solver/{key}"
    if key.startswith(_JACOBIAN):
        return f"jacobian/{key}"
    if key in _OPTIM or key in _PERF:
        return f"{'optim' if key in _OPTIM else 'perf'}/{key}"
    for prefix in _STRIPPED:
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"other/{key}"


class TensorBoardWriter:
    """Rank 0's TensorBoard event files under `<run_uri>/<subdir>`.

    A local path is written in place. A URI (anything with "://", file://
    included) is written to a local temporary directory, and each event file is
    copied whole to the URI on `flush()` and `close()`: object stores cannot
    append, and SummaryWriter writes local files only.
    """

    def __init__(self, run_uri: str | os.PathLike, subdir: str = "tensorboard") -> None:
        from torch.utils.tensorboard import SummaryWriter

        run_uri = os.fspath(run_uri)
        self._dest = locate(run_uri).join(subdir) if "://" in run_uri else None
        if self._dest is not None:
            self.local_dir, self.logdir = tempfile.mkdtemp(prefix="deqray-tb-"), self._dest.uri
        else:
            self.local_dir = self.logdir = os.path.join(run_uri, subdir)
        self._writer = SummaryWriter(log_dir=self.local_dir)
        self._closed = False

    def scalars(self, metrics: dict, step: int, prefix_map: dict[str, str] | None = None):
        """One scalar per numeric value (NaN and inf included); strings and the like skipped."""
        for key, value in metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, numbers.Real):
                self._writer.add_scalar(tag_for(key, prefix_map), float(value), step)

    def histograms(self, values: dict[str, Tensor], step: int) -> None:
        """`solver/<key>` histograms of the finite values (a histogram has no bin for the
        others); a key with none is skipped."""
        for key, v in values.items():
            v = v.detach().flatten().to("cpu", torch.float64)
            v = v[torch.isfinite(v)]
            if v.numel():
                self._writer.add_histogram(f"solver/{key}", v.numpy(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        if self._upload() and self._dest is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def _upload(self) -> bool:
        """Copy the event files to the URI (whole: they are small); False if that failed.

        A failed upload is a warning, not the end of a run: the files stay in
        `local_dir` and the next flush or close tries again.
        """
        if self._dest is None:
            return True
        try:
            for root, _, files in os.walk(self.local_dir):
                for name in files:
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                    with open(path, "rb") as fh:
                        self._dest.join(rel).write_bytes(fh.read())
        except OSError as err:
            log.warning("TensorBoard upload to %s failed (%s)", self.logdir, err)
            return False
        return True

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
