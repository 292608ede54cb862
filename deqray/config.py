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
scaling, checkpoint, logging, debug (test-only fault injection). Every key
is checked on load: an unknown key or a wrong type fails with the file, the
dotted key and the nearest valid key.
Overrides are `section.key=value` strings whose value is read as YAML
(`optim.lr=1e-3`, `model.preset=mdeq-cifar-tiny`, `deq.f_solver=broyden`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from deqray.core._errors import suggest

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


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

    # the directory / URI of a preprocessed data set (its manifest.json), or the
    # name of one of the task's embedded sets (generated on first use, no download)
    source: str = ""
    options: dict = field(default_factory=dict)  # the embedded generator's options
    cache: str | None = None  # where embedded sets go (default ~/.cache/deqray/data)
    train_split: str = "train"
    eval_split: str | None = None  # default: the task's choice among the other splits


@dataclass
class Regularization:
    jac_loss_weight: float = 0.0  # weight of ||J_f||_F^2 / dim (Hutchinson) in the loss
    jac_loss_freq: float = 0.0  # probability that a step computes it
    jac_incremental: int = 0  # raise the weight by 0.1 every this many steps (0: never)
    pretrain_jac_loss_weight: float = 0.0  # the weight during pretraining (unrolled) steps
    jac_stop_step: int | None = None  # no Jacobian loss from this step on


@dataclass
class Optim:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw
    schedule: Literal["cosine", "constant"] = "cosine"  # after the warmup
    warmup_steps: int = 0  # linear from 0 to lr
    min_lr: float = 0.0  # the cosine's floor
    clip_grad_norm: float | None = None
    steps: int | None = None  # the length of the run: steps, or
    epochs: float | None = None  # epochs of the training split
    batch_size: int = 16  # global: divided among the workers
    eval_batch_size: int | None = None  # global (default: batch_size)


@dataclass
class Train:
    seed: int = 0
    # Unrolled weight-tied steps before the DEQ mode. None: the model config's
    # own pretrain_steps where it has one (MDEQ), else 0.
    pretrain_steps: int | None = None
    eval_every: int = 100  # steps between evaluations (each one reports metrics)
    eval_batches: int | None = None  # cap per evaluation and worker (None: the whole split)
    eval_sradius: bool = False  # spectral radius of J_f at the equilibrium on evaluation
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on GPU only
    # Divergence: a non-finite loss ends the run at once; so do `diverge_patience`
    # evaluations in a row whose training forwards (DEQ mode) ended with a mean
    # relative residual above `max_residual` (null: never). Not reaching f_tol
    # is no divergence (short budgets are a recipe), a residual that stays
    # near 1 is: the iteration no longer contracts.
    diverge_patience: int = 3
    max_residual: float | None = 0.3
    log_every: int = 10  # steps between progress lines
    stop_at_step: int | None = None  # end the run here (as if stopped) keeping the schedule


@dataclass
class Scaling:
    workers: int = 1
    gpus_per_worker: float = 0.0
    # None: 1 with GPUs; 0.5 without, which leaves CPUs for Ray Data's reads
    # (on 2 cores, 2 workers x 1 CPU would starve them).
    cpus_per_worker: float | None = None


@dataclass
class Checkpoint:
    storage: str | None = None  # local directory or URI (default ./runs)
    name: str | None = None  # None: a new unique name; an existing name resumes that run
    every: int | None = None  # steps between checkpoints (default: eval_every)
    keep: int | None = 2  # newest checkpoints kept (None: all)
    max_failures: int = 0  # worker failures survived by restoring the last checkpoint


@dataclass
class Logging:
    tensorboard: bool = True  # rank 0 writes event files to <run>/tensorboard
    histograms: bool = True  # per-sample solver residuals and steps, on evaluation
    progress: bool = True  # a progress line from rank 0 every train.log_every steps


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


@dataclass
class Experiment:
    # What is learned: a shipped task (language_model, image_classification,
    # segmentation) or a user's by import path ("mypkg.tasks:FlowTask").
    # None: the shipped task whose models include `model` (its preset's family).
    task: str | None = None
    model: dict = field(default_factory=dict)  # the task's model section ({}: its default)
    data: DataSection = field(default_factory=DataSection)  # the task's own section class
    deq: dict = field(default_factory=dict)  # DEQConfig overrides (f_thres, b_solver, ...)
    reg: Regularization = field(default_factory=Regularization)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    scaling: Scaling = field(default_factory=Scaling)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    logging: Logging = field(default_factory=Logging)
    debug: Debug = field(default_factory=Debug)
    source: str | None = None  # the file it was read from (set by load_config)

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
        # the data section's keys are the task's: build it with its class
        if data.get("data") is None:
            data["data"] = {}
        cfg = _build(cls, data, (), where, origin, {"data": task.data_section})
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
        origin = origin or {}

        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{origin.get(key, where)}: {key}: {message}")

        task = self.get_task()
        try:
            task.model_config(self)
        except ConfigError as e:
            raise ConfigError(_blame(str(e), origin, where)) from None
        except (ValueError, TypeError) as e:
            keys = [k for k in origin if k.startswith(("model", "deq"))]
            raise ConfigError(f"{origin.get(keys[0], where) if keys else where}: {e}") from None
        o, t, r, s = self.optim, self.train, self.reg, self.scaling
        if (o.steps is None) == (o.epochs is None):
            fail("optim.steps", "give exactly one of optim.steps and optim.epochs")
        if o.steps is not None and o.steps < 1:
            fail("optim.steps", f"must be >= 1, got {o.steps}")
        if o.epochs is not None and o.epochs <= 0:
            fail("optim.epochs", f"must be > 0, got {o.epochs}")
        if o.lr <= 0:
            fail("optim.lr", f"must be > 0, got {o.lr}")
        if o.weight_decay < 0:
            fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
        if not 0 <= o.min_lr <= o.lr:
            fail("optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
        if o.momentum < 0:
            fail("optim.momentum", f"must be >= 0, got {o.momentum}")
        if o.name == "sgd" and o.nesterov and o.momentum == 0:
            fail("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            fail("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
        if o.warmup_steps < 0:
            fail("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
        if o.clip_grad_norm is not None and o.clip_grad_norm <= 0:
            fail("optim.clip_grad_norm", f"must be > 0 (or null), got {o.clip_grad_norm}")
        if s.workers < 1:
            fail("scaling.workers", f"must be >= 1, got {s.workers}")
        if s.gpus_per_worker < 0:
            fail("scaling.gpus_per_worker", f"must be >= 0, got {s.gpus_per_worker}")
        if s.cpus_per_worker is not None and s.cpus_per_worker <= 0:
            fail("scaling.cpus_per_worker", f"must be > 0, got {s.cpus_per_worker}")
        for key in ("batch_size", "eval_batch_size"):
            b = getattr(o, key)
            if b is None:
                continue
            if b < 1 or b % s.workers:
                fail(
                    f"optim.{key}",
                    f"{b} is not a positive multiple of scaling.workers={s.workers} "
                    "(it is the global batch, divided among the workers)",
                )
        if not 0 <= r.jac_loss_freq <= 1:
            fail("reg.jac_loss_freq", f"is a probability, got {r.jac_loss_freq}")
        for key in ("jac_loss_weight", "pretrain_jac_loss_weight"):
            if getattr(r, key) < 0:
                fail(f"reg.{key}", f"must be >= 0, got {getattr(r, key)}")
        if r.jac_incremental < 0:
            fail("reg.jac_incremental", f"must be >= 0, got {r.jac_incremental}")
        if t.eval_every < 1:
            fail("train.eval_every", f"must be >= 1, got {t.eval_every}")
        if t.log_every < 1:
            fail("train.log_every", f"must be >= 1, got {t.log_every}")
        if t.pretrain_steps is not None and t.pretrain_steps < 0:
            fail("train.pretrain_steps", f"must be >= 0, got {t.pretrain_steps}")
        if t.diverge_patience < 1:
            fail("train.diverge_patience", f"must be >= 1, got {t.diverge_patience}")
        if t.max_residual is not None and t.max_residual <= 0:
            fail("train.max_residual", f"must be > 0 (or null), got {t.max_residual}")
        if self.checkpoint.every is not None and self.checkpoint.every < 1:
            fail("checkpoint.every", f"must be >= 1, got {self.checkpoint.every}")
        if self.checkpoint.keep is not None and self.checkpoint.keep < 1:
            fail("checkpoint.keep", f"must be >= 1 (or null for all), got {self.checkpoint.keep}")
        if self.checkpoint.max_failures < -1:
            fail("checkpoint.max_failures", "must be >= 0, or -1 for no limit")
        name = self.checkpoint.name
        if name is not None and (not name or "/" in name or name in (".", "..")):
            fail("checkpoint.name", f"must be a plain directory name, got {name!r}")
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
    key = message.split(":", 1)[0].strip()
    for k, o in origin.items():
        if key == k or key.startswith(k + ".") or k.startswith(key + "."):
            return f"{o}: {message}"
    return f"{where}: {message}"


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
# the typed conversion
# --------------------------------------------------------------------------- #


def parse_section(cls: type, data: Any, key: str, where: str | None = None) -> Any:
    """Dataclass `cls` from the mapping `data` found at dotted `key` (e.g. a task's own
    `model:` section), with the experiment's checks: unknown keys name the nearest
    valid one, values must fit the field types. Errors start with `where`; without
    it, with the key (the experiment's checks then name the file or override)."""
    path = tuple(key.split(".")) if key else ()
    try:
        return _build(cls, {} if data is None else data, path, where or _NOWHERE, {})
    except ConfigError as e:
        text = str(e)
        if where is None and text.startswith(_NOWHERE + ": "):
            raise ConfigError(text[len(_NOWHERE) + 2 :]) from None
        raise


def check_value(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to the type `hint` (as a config field of that type would take it);
    ConfigError "key: expected ..., got ..." when it does not fit."""
    try:
        return _convert(value, hint, key, _NOWHERE)
    except ConfigError as e:
        raise ConfigError(str(e)[len(_NOWHERE) + 2 :]) from None


_NOWHERE = "\0"


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


def _build(
    cls: type,
    data: Any,
    path: tuple[str, ...],
    where: str,
    origin: dict,
    sections: dict[str, type] | None = None,
) -> Any:
    """`cls` from a mapping, every value checked against its type hint. `sections` gives
    the class of a section whose hint is only a base class (the task's data section)."""
    dotted = ".".join(path) or "(top)"

    def src(key: str) -> str:
        for k, o in origin.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return o
        return where

    if not isinstance(data, dict):
        raise ConfigError(f"{src(dotted)}: {dotted}: expected a section (mapping), got {data!r}")
    hints = {**typing.get_type_hints(cls), **(sections or {})}
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = ".".join((*path, str(key)))
        if key not in names:
            owner = getattr(cls, "owner", None)  # a task's section names its task
            raise ConfigError(
                f"{src(full)}: unknown key {full!r}{suggest(str(key), names)}; "
                f"valid keys{' of ' + dotted if path else ''}"
                f"{f' (task {owner})' if owner else ''}: {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(
                hint, value if value is not None else {}, (*path, key), where, origin
            )
        else:
            kwargs[key] = _convert(value, hint, full, src(full))
    for key, hint in (sections or {}).items():  # a section the mapping left out
        kwargs.setdefault(key, hint())
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None):
            if value is None:
                return None
            continue
        base = typing.get_origin(opt) or opt
        if base is Literal:
            if value in typing.get_args(opt):
                return value
            continue
        if base is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if base is int and isinstance(value, int):
            return value
        if base is float and isinstance(value, (int, float)):
            return float(value)
        if base is str and isinstance(value, str):
            return value
        if base is list and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(opt) or (Any,)
            if item is Any:
                return list(value)
            return [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        if base is dict and isinstance(value, dict):
            return dict(value)
        if base is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    msg = f"{where}: {key}: expected {_type_name(hint)}, got {value!r}"
    lits = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
    if lits and isinstance(value, str):
        msg += suggest(value, [str(a) for a in lits])
    raise ConfigError(msg)


__all__ = [
    "Checkpoint",
    "ConfigError",
    "DataSection",
    "Debug",
    "Experiment",
    "Logging",
    "Optim",
    "Regularization",
    "Scaling",
    "Train",
    "find_config",
    "load_config",
    "check_value",
    "parse_overrides",
    "parse_section",
    "shipped_configs",
]
