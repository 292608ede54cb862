"""The experiment config: one typed object from YAML (plus dotted overrides) to the worker loop.

    cfg = load_config("deqray/configs/markov-tiny.yaml", ["deq.f_thres=24", "optim.lr=1e-3"])
    cfg = load_config("markov-tiny")            # a config shipped in deqray/configs
    cfg.to_dict() / Experiment.from_dict(d)     # what travels to Ray workers and sweeps

`task` names what is learned (a shipped task or a user's, by import path;
see `deqray.tasks`). Sections (each a dataclass below): model (checked by
the task: for the shipped ones a preset name and field overrides, validated
by `deqray.models`), data (the task's own section class, built on
`DataSection`), deq (overrides of the DEQ solver settings, validated by
`DEQConfig`), reg (Jacobian regularisation), optim, train (the loop),
scaling, checkpoint, logging, tracking (MLflow), debug (test-only fault injection).

The dataclasses are the schema: a field's annotation holds its type, its
bounds and its doc (`Annotated[int, Field(ge=1, description=...)]`), which
pydantic checks on load (`deqray.schema.validate`: an unknown key, a wrong
type or a value out of bounds fails with the file or override, the dotted key,
and the nearest valid key or the expected type) and writes as JSON Schema
(`deqray schema experiment`, for editors). `Experiment.validate` adds what
no single field can say (steps or epochs, the batch against the workers, the
task's own checks).
Overrides are `section.key=value` strings whose value is read as YAML
(`optim.lr=1e-3`, `model.preset=mdeq-cifar-tiny`, `deq.f_solver=broyden`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal

import yaml
from pydantic import Field
from typing_extensions import TypeVar

from deqray.core._errors import suggest
from deqray.schema import ConfigError, field_types, json_schema, source_of, validate

CONFIG_DIR = Path(__file__).parent / "configs"

# shorthands for the bounds of the fields below
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a config means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------- #
# sections
# --------------------------------------------------------------------------- #


@dataclass
class DataSection:
    """The `data:` keys every task has; a task's own section (its `data_section`)
    subclasses this one with the keys of its data."""

    owner: ClassVar[str] = ""  # the task whose section this is (named in errors)

    source: str = ""
    """A preprocessed data set (the directory or URI of its manifest.json), or the name of
    one of the task's embedded sets (generated on first use, no download)."""
    options: dict = field(default_factory=dict)
    """The embedded set's generator options."""
    cache: str | None = None
    """Where embedded sets are generated (default ~/.cache/deqray/data)."""
    train_split: str = "train"
    eval_split: str | None = None
    """Default: the task's choice among the other splits."""


@dataclass
class Regularization:
    jac_loss_weight: NonNegative = 0.0
    """Weight of ||J_f||_F^2 / dim (Hutchinson's estimate) in the loss."""
    jac_loss_freq: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Probability that a step computes the Jacobian loss."""
    jac_incremental: Count = 0
    """Raise the weight by 0.1 every this many steps (0: never)."""
    pretrain_jac_loss_weight: NonNegative = 0.0
    """The weight during the pretraining (unrolled) steps."""
    jac_stop_step: int | None = None
    """No Jacobian loss from this step on."""


@dataclass
class Optim:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """The peak learning rate (after the warmup)."""
    weight_decay: NonNegative = 0.0
    momentum: NonNegative = 0.9
    """sgd only."""
    nesterov: bool = False
    """sgd only; needs momentum > 0."""
    betas: Annotated[
        list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)
    ] = field(default_factory=lambda: [0.9, 0.999])
    """adam / adamw."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After the warmup."""
    warmup_steps: Count = 0
    """Linear from 0 to lr."""
    min_lr: NonNegative = 0.0
    """The cosine's floor (at most lr)."""
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = None
    steps: Positive | None = None
    """The length of the run: steps, or epochs (exactly one of them)."""
    epochs: Annotated[float, Field(gt=0)] | None = None
    """Epochs of the training split."""
    batch_size: Positive = 16
    """Global: divided among the workers (a multiple of scaling.workers)."""
    eval_batch_size: Positive | None = None
    """Global (default: batch_size)."""


@dataclass
class Train:
    seed: int = 0
    pretrain_steps: Count | None = None
    """Unrolled weight-tied steps before the DEQ mode (default: the model config's own
    pretrain_steps where it has one, as MDEQ does, else 0)."""
    eval_every: Positive = 100
    """Steps between evaluations (each one reports metrics)."""
    eval_batches: int | None = None
    """Cap per evaluation and worker (null: the whole split)."""
    eval_sradius: bool = False
    """The spectral radius of J_f at the equilibrium, on evaluation."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """auto: bf16 autocast on GPU only."""
    # Divergence: a non-finite loss ends the run at once; so do `diverge_patience`
    # evaluations in a row whose training forwards (DEQ mode) ended with a mean
    # relative residual above `max_residual` (null: never). Not reaching f_tol
    # is no divergence (short budgets are a recipe), a residual that stays
    # near 1 is: the iteration no longer contracts.
    diverge_patience: Positive = 3
    """Evaluations in a row above max_residual that end the run as diverged."""
    max_residual: Annotated[float, Field(gt=0)] | None = 0.3
    """The mean relative residual of training forwards that counts as diverging (null: never)."""
    log_every: Positive = 10
    """Steps between progress lines."""
    stop_at_step: int | None = None
    """End the run here (as if stopped), keeping the schedule of the whole run."""


@dataclass
class Scaling:
    workers: Positive = 1
    gpus_per_worker: NonNegative = 0.0
    # (on 2 cores, 2 workers x 1 CPU would starve Ray Data's reads)
    cpus_per_worker: Annotated[float, Field(gt=0)] | None = None
    """Default: 1 with GPUs, 0.5 without (leaving CPUs for Ray Data's reads)."""


@dataclass
class Checkpoint:
    storage: str | None = None
    """Local directory or URI (default ./runs)."""
    name: str | None = None
    """A plain directory name; null: a new unique name; an existing name resumes that run."""
    every: Positive | None = None
    """Steps between checkpoints (default: train.eval_every)."""
    keep: Positive | None = 2
    """Newest checkpoints kept (null: all)."""
    max_failures: Annotated[int, Field(ge=-1)] = 0
    """Worker failures survived by restoring the last checkpoint (-1: no limit)."""


@dataclass
class Logging:
    tensorboard: bool = True
    """Rank 0 writes event files to <run>/tensorboard."""
    histograms: bool = True
    """Per-sample solver residuals and steps, on evaluation."""
    progress: bool = True
    """A progress line from rank 0 every train.log_every steps."""


@dataclass
class MLflowTracking:
    # An MLflow tracking server (http://host:5000) or store (sqlite:///abs/path.db)
    # that every report is logged to, through Ray's MLflow integration
    # (deqray/tracking.py); null: no MLflow. Needs `pip install 'deqray[tracking]'`.
    uri: str | None = None
    # The MLflow experiment the runs join (created if missing). Default: the
    # config file's stem (`deqray train`) or the study's name (`deqray tune`).
    experiment_name: str | None = None

    def problem(self) -> tuple[str, str] | None:
        """(dotted key, complaint) where the section cannot be used, else None."""
        import importlib.util

        if self.uri is None:
            if self.experiment_name is not None:
                return "tracking.mlflow.experiment_name", "given without tracking.mlflow.uri"
            return None
        if not self.uri.strip():
            return "tracking.mlflow.uri", "is empty (null: no MLflow tracking)"
        if self.experiment_name is not None and not self.experiment_name.strip():
            return "tracking.mlflow.experiment_name", "is empty (null: the default name)"
        if importlib.util.find_spec("mlflow") is None:
            return "tracking.mlflow.uri", "MLflow is not installed: pip install 'deqray[tracking]'"
        return None


@dataclass
class Tracking:
    mlflow: MLflowTracking = field(default_factory=MLflowTracking)


@dataclass
class Debug:
    # Test-only fault injection: rank `fail_rank` kills its own process when it
    # reaches `fail_at_step`, `fail_times` times over the run (counted in the
    # run's storage, so a restored worker does not fail again forever).
    fail_at_step: int | None = None
    fail_rank: int = 0
    fail_times: int = 1
    # Test-only: multiply the loss by NaN from this step on (divergence tests).
    nan_at_step: int | None = None


# The class of the data section: the task's own (`Experiment[task.data_section]` is what
# a file is validated as; `deqray schema experiment` takes any shipped task's section).
D = TypeVar("D", bound=DataSection, default=DataSection)


@dataclass
class Experiment(Generic[D]):
    task: str | None = None
    """What is learned: a shipped task (language_model, image_classification, segmentation)
    or a user's by import path ("mypkg.tasks:FlowTask"); null: the shipped task whose
    models include `model` (its preset's family)."""
    model: dict = field(default_factory=dict)
    """The task's model section (shipped tasks: a preset and field overrides; {}: the
    task's default model)."""
    data: D = field(default_factory=DataSection)  # type: ignore[assignment]
    """The task's data section."""
    deq: dict = field(default_factory=dict)
    """Overrides of the DEQ solver settings (deqray.core.DEQConfig: f_thres, b_solver, ...)."""
    reg: Regularization = field(default_factory=Regularization)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    scaling: Scaling = field(default_factory=Scaling)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    logging: Logging = field(default_factory=Logging)
    tracking: Tracking = field(default_factory=Tracking)  # MLflow (deqray/tracking.py)
    debug: Debug = field(default_factory=Debug)
    source: str | None = None
    """The file it was read from (set by load_config)."""

    # ---- conversions -------------------------------------------------------- #

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls, data: dict, where: str = "config", overrides: dict | None = None
    ) -> Experiment:
        """A validated config from a mapping, with {dotted.key: value} overrides applied."""
        from deqray.tasks.registry import task_for

        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping at the top, got {type(data).__name__}")
        data = copy.deepcopy(data)
        origin: dict[str, str] = {}
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value, where)
            origin[key] = f"override {key}={value!r}"
        task = task_for(data.get("task"), data.get("model"), origin.get("task", where))
        for name in (*_SECTIONS, "data"):  # an empty section (`optim:` alone): its defaults
            if name in data and data[name] is None:
                data[name] = {}
        data.setdefault("data", {})  # the task's section with its defaults, not DataSection's
        cfg = validate(cls[task.data_section], data, where=where, origin=origin)
        cfg.validate(where, origin)
        return cfg

    def with_overrides(self, overrides: dict | list[str], where: str | None = None) -> Experiment:
        """A new config with dotted overrides ({key: value} or ["key=value", ...]) applied."""
        if isinstance(overrides, (list, tuple)):
            overrides = parse_overrides(overrides)
        return Experiment.from_dict(self.to_dict(), where or self.source or "config", overrides)

    # ---- derived ------------------------------------------------------------ #

    def get_task(self):
        """The `deqray.tasks.Task` this experiment trains."""
        from deqray.tasks.registry import task_for

        return task_for(self.task, self.model, self.source or "config")

    def model_config(self) -> Any:
        """The task's model config: `model` and the `deq` section (before the data's sizes)."""
        return self.get_task().model_config(self)

    def pretrain_steps(self) -> int:
        if self.train.pretrain_steps is not None:
            return self.train.pretrain_steps
        return int(getattr(self.model_config(), "pretrain_steps", 0) or 0)

    def checkpoint_every(self) -> int:
        return self.checkpoint.every or self.train.eval_every

    # ---- semantic checks ---------------------------------------------------- #

    def validate(self, where: str = "config", origin: dict | None = None) -> None:
        """What no single field's bounds can say (the fields' own were checked on load)."""
        origin = origin or {}

        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{source_of(key, origin, where)}: {key}: {message}")

        task = self.get_task()
        try:
            task.model_config(self)
        except ConfigError as e:
            raise ConfigError(_blame(str(e), origin, where)) from None
        except (ValueError, TypeError) as e:
            keys = [k for k in origin if k.startswith(("model", "deq"))]
            raise ConfigError(f"{origin.get(keys[0], where) if keys else where}: {e}") from None
        o, s = self.optim, self.scaling
        if (o.steps is None) == (o.epochs is None):
            fail("optim.steps", "give exactly one of optim.steps and optim.epochs")
        if o.min_lr > o.lr:
            fail("optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
        if o.name == "sgd" and o.nesterov and o.momentum == 0:
            fail("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")
        for key in ("batch_size", "eval_batch_size"):
            b = getattr(o, key)
            if b is not None and b % s.workers:
                fail(
                    f"optim.{key}",
                    f"{b} is not a positive multiple of scaling.workers={s.workers} "
                    "(it is the global batch, divided among the workers)",
                )
        name = self.checkpoint.name
        if name is not None and (not name or "/" in name or name in (".", "..")):
            fail("checkpoint.name", f"must be a plain directory name, got {name!r}")
        problem = self.tracking.mlflow.problem()
        if problem is not None:
            fail(*problem)
        d = self.data
        if not d.source:
            fail("data.source", "is empty")
        try:
            task.check(self)
        except ConfigError as e:
            raise ConfigError(_blame(str(e), origin, where)) from None


def _blame(message: str, origin: dict, where: str) -> str:
    """A task's "key: message" complaint, prefixed with the override or file that set the key."""
    if message.startswith(f"{where}: ") or any(message.startswith(o) for o in origin.values()):
        return message
    return f"{source_of(message.split(':', 1)[0].strip(), origin, where)}: {message}"


_SECTIONS = [n for n, h in field_types(Experiment).items() if dataclasses.is_dataclass(h)]


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #


def shipped_configs() -> list[str]:
    """Names of the configs in deqray/configs (usable as `deqray train NAME`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(path_or_name: str) -> Path:
    """A config file: a path, or the name of a shipped config."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{path_or_name}.yaml"
    if os.sep not in path_or_name and not path_or_name.endswith((".yaml", ".yml")):
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"{path_or_name}: no such config file{suggest(p.stem, shipped_configs())}; "
        f"shipped configs: {', '.join(shipped_configs())}"
    )


def load_config(
    path_or_name: str | os.PathLike, overrides: list[str] | dict | None = None
) -> Experiment:
    """Read a YAML experiment config (a path or a shipped name) and apply overrides."""
    path = find_config(str(path_or_name))
    try:
        data = _yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    cfg = Experiment.from_dict(data, str(path), overrides)
    cfg.source = str(path)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["optim.lr=1e-3", "deq.f_solver=broyden"] -> {"optim.lr": 0.001, ...} (values as YAML)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            out[key] = _yaml(text) if text.strip() else None
        except yaml.YAMLError:
            out[key] = text
    return out


# --------------------------------------------------------------------------- #
# other sections, single values, the JSON Schema
# --------------------------------------------------------------------------- #


def parse_section(cls: type, data: Any, key: str, where: str | None = None) -> Any:
    """Dataclass `cls` from the mapping `data` found at dotted `key` (e.g. a task's own
    `model:` section), with the experiment's checks: unknown keys name the nearest
    valid one, values must fit the field types. Errors start with `where`; without
    it, with the key (the experiment's checks then name the file or override)."""
    return validate(cls, {} if data is None else data, key, where)


def check_value(value: Any, hint: Any, key: str) -> Any:
    """`value` as a config field annotated `hint` takes it (an int made a float for a float
    field); ConfigError "key: expected ..., got ..." when it does not fit."""
    return validate(hint, value, key)


def experiment_schema() -> dict:
    """The JSON Schema of an experiment file (`deqray schema experiment`). Its `data`
    section may be any shipped task's; a user's task checks its own on load."""
    from deqray.tasks.registry import load_task, shipped_tasks

    sections = tuple(load_task(name).data_section for name in shipped_tasks())
    return json_schema(
        Experiment[typing.Union[sections]],  # noqa: UP007 (a Union of a runtime tuple)
        "deqray experiment",
        "An experiment config of deqray (deqray train FILE); deqray schema experiment.",
    )


def _set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {key}: {'.'.join(parts[: i + 1])} is not a section ({where})"
            )
        node = child
    node[parts[-1]] = value


__all__ = [
    "Checkpoint",
    "ConfigError",
    "DataSection",
    "Debug",
    "Experiment",
    "Logging",
    "MLflowTracking",
    "Optim",
    "Regularization",
    "Scaling",
    "Tracking",
    "Train",
    "find_config",
    "load_config",
    "check_value",
    "experiment_schema",
    "parse_overrides",
    "parse_section",
    "shipped_configs",
]
