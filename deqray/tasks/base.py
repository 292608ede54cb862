"""The `Task` interface: the one place that knows what is learned.

A task joins a model to its data and its metrics. Everything else of a run —
the Ray Train worker loop, checkpoints and exact resume, divergence handling,
solver statistics, Jacobian regularisation, TensorBoard, the progress line,
Tune objectives — is the platform's, and works for any task without knowing
which it is.

A task answers, on the driver (before Ray Train starts):

* `model_config(exp)`: its model config from the experiment's `model` and
  `deq` sections (an object with `build() -> nn.Module`); a bad key raises
  ValueError or ConfigError naming it.
* `metrics(exp)`: the evaluation metrics it reports (`Metric`), the primary
  one (with its direction) first.
* `plan(exp, batching)`: reads (or generates) its data and returns a
  `DataPlan`: the model config with the data's sizes filled in, the
  evaluation split, steps per epoch, items per step, and anything of its own
  the workers need (`details`).
* `datasets(run)`: the Ray Datasets and Ray Train `DataConfig` for
  `TorchTrainer(datasets=..., dataset_config=...)`.

and on each worker (plain PyTorch; no Ray needed except for the shards):

* `build_model(run)`, `train_batches(shard, run, device)`,
  `eval_batches(shard, run, device)`;
* `loss(model, batch, state, pretrain=..., jac_loss=...) -> StepOutput`: the
  task's loss (the platform adds the Jacobian term and steps the optimiser);
  `state` is what a rank carries from one batch to the next (segment memory),
  `None` for most tasks;
* `eval_metrics(model) -> {name: torchmetrics.Metric}` (optional): fresh
  metrics for one evaluation pass, the same on every rank;
* `eval_step(model, batch, state, sradius=...) -> EvalOutput` and
  `summarize(values) -> metrics`: each batch's `updates` (the arguments of
  the `update()` of the metric of that name) and `sums` (numbers, added up
  over the batches and the ranks); torchmetrics syncs them over the ranks, and
  `summarize` gets {name: computed value} (a float, or a tensor) of both.

`state_at_epoch_start()` gives the state of a new pass over the data (None by
default); `split_batches(run, split, device)` and `count_batches(run, split)`
give a whole split in one process for `deqray evaluate` (by default through
`datasets` and `eval_batches`). A subclass sets `name` (how reports call it), `unit` (what one
item is: "tok", "img"; the throughput's unit) and `data_section` (the
dataclass of its `data:` section, a subclass of `deqray.config.DataSection`).
The section is validated with the experiment's schema (`deqray.schema`): its
fields' types, and bounds written as `Annotated[int, Field(ge=1)]`; a task
that reads its `model:` section into a dataclass does so with
`deqray.config.parse_section`, under the same rules.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

from deqray.config import DataSection

if TYPE_CHECKING:
    from torchmetrics import Metric as Metric_

    from deqray.config import Experiment
    from deqray.core import DEQInfo


@dataclass(frozen=True)
class Metric:
    """An evaluation metric a task reports: `name` (a key of the report, val_*), the
    direction that is better, and what it is."""

    name: str
    direction: Literal["min", "max"] | None  # None: a count, not something to optimise
    doc: str = ""


@dataclass(frozen=True)
class Batching:
    """How the global batch is divided: what a task needs to know to plan its epochs."""

    workers: int
    batch_per_worker: int
    eval_batch_per_worker: int


@dataclass
class DataPlan:
    """What a task decided from its data, on the driver."""

    model: Any  # the model config, the data's sizes (vocabulary, classes) filled in
    train_split: str
    eval_split: str
    steps_per_epoch: int  # optimiser steps in one pass over the training split
    items_per_step: int  # tokens / images / samples in one global step (throughput)
    root: str | None = None  # the data's manifest directory, when it has one
    details: Any = None  # anything else of the task's own that the workers need


@dataclass
class RunContext:
    """Everything a worker derives from the config and the data, decided once by the driver.

    It travels to the workers as it is (Ray pickles it), typed all the way.
    """

    experiment: Experiment
    task: Task
    plan: DataPlan
    batching: Batching
    total_steps: int
    pretrain_steps: int
    run_uri: str

    @property
    def model(self) -> Any:
        return self.plan.model

    @property
    def train_split(self) -> str:
        return self.plan.train_split

    @property
    def eval_split(self) -> str:
        return self.plan.eval_split

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def eval_batches(self) -> int | None:
        """Cap on the evaluation batches per worker (None: the whole split)."""
        return self.experiment.train.eval_batches


@dataclass
class StepOutput:
    """One training batch through the task: the loss to minimise and the solve's info."""

    loss: Tensor  # scalar, differentiable; the platform adds the Jacobian term
    info: DEQInfo  # the equilibrium solve (jac_loss set when asked for)
    items: int  # tokens / images / samples in the batch
    state: Any = None  # carried to this rank's next batch (e.g. segment memory)


@dataclass
class EvalOutput:
    """One evaluation batch: what updates the task's metrics, and sums to add up."""

    sums: dict[str, float | Tensor] = field(default_factory=dict)  # numbers: {"tokens": 80.0}
    info: DEQInfo | None = None  # the solve, for the solver statistics of the evaluation
    state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-batch outputs a caller may want
    # {metric name: its update()'s arguments (a tuple, or one)}, for `eval_metrics`' metrics
    updates: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """Base class of every task; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "items"
    data_section: ClassVar[type[DataSection]] = DataSection
    # keys of the `model:` section that choose a model rather than set one of its
    # fields, with their types (a sweep may search them): the shipped tasks' "preset"
    model_selectors: ClassVar[dict[str, type]] = {}

    # ---- driver side ---------------------------------------------------------------- #

    @abstractmethod
    def model_config(self, exp: Experiment) -> Any:
        """The model config from `exp.model` and `exp.deq` (before the data is read)."""

    @abstractmethod
    def metrics(self, exp: Experiment) -> list[Metric]:
        """The metrics `summarize` reports; the first is the primary one."""

    def check(self, exp: Experiment) -> None:  # noqa: B027 (optional hook)
        """Checks of the experiment that need no data (raise ConfigError naming the key)."""

    @abstractmethod
    def plan(self, exp: Experiment, batching: Batching) -> DataPlan:
        """Read or generate the data; decide the model's data-dependent sizes and the epochs."""

    @abstractmethod
    def datasets(self, run: RunContext) -> tuple[dict[str, Any], Any]:
        """({split: ray.data.Dataset}, ray.train.DataConfig or None) for the TorchTrainer."""

    # ---- worker side ------------------------------------------------------------------ #

    def build_model(self, run: RunContext) -> nn.Module:
        return run.model.build()

    @abstractmethod
    def train_batches(self, shard: Any, run: RunContext, device: Any) -> Iterable[Any]:
        """One epoch of this rank's training batches from its Ray dataset shard."""

    @abstractmethod
    def eval_batches(self, shard: Any, run: RunContext, device: Any) -> Iterable[Any]:
        """This rank's evaluation batches (at most `run.eval_batches` of them when set)."""

    def state_at_epoch_start(self) -> Any:
        return None

    def split_batches(self, run: RunContext, split: str, device: Any) -> Iterable[Any]:
        """Every batch of `split` in one process, in order (`deqray evaluate`): by default
        the split's Ray Dataset from `datasets(run)` through `eval_batches`."""
        datasets, _ = self.datasets(run)
        return self.eval_batches(datasets[split], run, device)

    # Whether `eval_curve_step` gives every budget of a compute-quality curve from one
    # solve (the solver's snapshots); otherwise `deqray evaluate` runs one pass a budget.
    curve_from_one_solve: ClassVar[bool] = False

    def eval_curve_step(
        self, model: nn.Module, batch: Any, state: Any, budgets: list[int]
    ) -> dict[int, EvalOutput]:
        """One evaluation batch at each forward budget, from one solve: {budget: EvalOutput},
        each equal to `eval_step` with the model's eval budget set to it."""
        raise NotImplementedError(f"task {self.name!r} evaluates one budget per pass")

    def count_batches(self, run: RunContext, split: str) -> int | None:
        """How many batches `split_batches` yields, when the task knows (progress lines)."""
        return None

    @abstractmethod
    def loss(
        self, model: nn.Module, batch: Any, state: Any, *, pretrain: bool, jac_loss: bool
    ) -> StepOutput:
        """The task's loss on one training batch."""

    def eval_metrics(self, model: nn.Module) -> dict[str, Metric_]:
        """Fresh torchmetrics for one evaluation pass, by name (the names of
        `EvalOutput.updates`); every rank must build the same ones, since each is
        synced over the ranks with its own collectives. None by default."""
        return {}

    @abstractmethod
    def eval_step(self, model: nn.Module, batch: Any, state: Any, *, sradius: bool) -> EvalOutput:
        """One evaluation batch (called under no_grad, model in eval mode)."""

    @abstractmethod
    def summarize(self, sums: dict[str, float | Tensor]) -> dict[str, float]:
        """The metrics from the computed metrics and the sums over every batch and rank."""

    # ---- helpers -------------------------------------------------------------------- #

    def primary(self, exp: Experiment) -> Metric:
        return self.metrics(exp)[0]

    def __repr__(self) -> str:
        return f"<task {self.name or type(self).__qualname__}>"

    def __eq__(self, other: object) -> bool:  # tasks hold no state: one per class
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def snapshot_info(result: Any) -> DEQInfo:
    """The DEQInfo of a solve as it stood at a snapshot (a SolverResult), for its metrics."""
    from deqray.core import DEQInfo

    return DEQInfo(
        mode="deq",
        nstep=result.nstep,
        abs_residual=result.abs_residual,
        rel_residual=result.rel_residual,
        converged=result.converged,
        nfe=result.nfe,
        forward=result,
    )


def missing_methods(cls: type) -> list[str]:
    """The abstract methods of `Task` that `cls` leaves unimplemented, in the base's order."""
    names = [n for n, v in vars(Task).items() if getattr(v, "__isabstractmethod__", False)]
    out = []
    for n in names:
        impl = getattr(cls, n, None)
        if impl is None or getattr(impl, "__isabstractmethod__", False):
            out.append(n)
    return out


def signature_of(name: str) -> str:
    """How the base class declares method `name` (for error messages)."""
    return f"{name}{inspect.signature(getattr(Task, name))}"
