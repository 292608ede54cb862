"""The study file's schema: what each key may hold, its bounds and its doc, in one place.

A study file is validated as `StudyFile` by `deqray.schema.validate` (pydantic:
unknown keys with the nearest valid one, types, bounds), and written as JSON
Schema by `study_schema()` (`deqray schema study`, for editors). What needs
the experiment or the other entries (a space key's type, `when` conditions,
objectives against the task's metrics, sampler options against optuna's
signature) is checked after, in study.py, space.py and sampler.py.

The shorthands of a file (`sampler: random`, `scheduler: asha`, a list of
choices for a categorical entry) are spelled out by `expand_shorthands`
before validation, so the schema has one form of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from deqray.config import Scaling, Tracking
from deqray.schema import json_schema

Choice = bool | int | float | str | None  # what optuna can store as a categorical value
Number = int | Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[int, Field(ge=1)]
SAMPLER_NAMES = ("tpe", "nsga2", "random", "grid")
SCHEDULER_NAMES = ("asha", "none")


@dataclass
class ParamSpec:
    """One entry of `space`: a distribution over a dotted experiment key."""

    type: Literal["int", "float", "categorical"]
    low: Number | None = None
    """The range's lower bound (int and float; an int for type int)."""
    high: Number | None = None
    """The range's upper bound, included."""
    step: Number | None = None
    """A discrete range: low, low + step, ..., high (it must divide high - low)."""
    log: bool = False
    """Sample the range on a log scale (low > 0; no step)."""
    choices: Annotated[list[Choice], Field(min_length=1)] | None = None
    """The values of a categorical entry."""
    when: Annotated[dict[str, Choice | list[Choice]], Field(min_length=1)] | None = None
    """Sample this entry only where every key given (an earlier entry) has the value given,
    or one of the list: {deq.grad: implicit}."""


@dataclass
class SamplerSection:
    """The optuna sampler; every other key is an option of its class (n_startup_trials, ...)."""

    # the options are the sampler class's own keyword arguments, checked against
    # its signature (sampler.py), so the section takes keys beyond these two
    __pydantic_config__ = ConfigDict(extra="allow", strict=True, use_attribute_docstrings=True)

    name: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    seed: Annotated[int, Field(ge=0)] | None = None
    """Default: the study's seed."""


@dataclass
class SchedulerSpec:
    """Tune's trial scheduler. ASHA's metric is the first objective, and its time
    unit the number of reports (`training_iteration`): one per evaluation."""

    name: Literal["asha", "none"] = "none"
    grace_period: Positive = 1
    """asha: reports a trial makes before it can be stopped."""
    reduction_factor: Annotated[int, Field(ge=2)] | Annotated[float, Field(ge=2)] = 4
    """asha: 1 / the fraction of trials kept at each rung."""
    max_t: Positive | None = None
    """asha: the reports of a whole trial (default: computed from the experiment)."""
    brackets: Positive = 1


@dataclass
class StudyFile:
    """A study: one YAML file describing a sweep (deqray tune FILE)."""

    base: str | dict[str, Any]
    """The experiment every trial starts from: a shipped config name, a path relative to
    this file, or an inline experiment mapping."""
    objectives: Annotated[dict[str, Literal["min", "max"]], Field(min_length=1)]
    """Metric -> min | max, in order; several make a multi-objective study. A metric is
    one the task declares (val_<name>) or the solver's and the loop's (val_fwd_nstep, ...)."""
    space: Annotated[dict[str, ParamSpec], Field(min_length=1)]
    """Dotted experiment key -> its distribution, in sampling order (a condition names an
    earlier entry). A list is short for {type: categorical, choices: [...]}."""
    name: str | None = None
    """The experiment's directory name (default: the file's stem)."""
    overrides: dict[str, Any] | None = None
    """Dotted experiment keys fixed for every trial ({optim.steps: 300}, or nested)."""
    sampler: SamplerSection | None = None
    scheduler: SchedulerSpec | None = None
    trials: Positive | None = None
    """How many trials (default for the grid sampler: the grid's size)."""
    concurrency: Positive = 1
    """Trials running at once."""
    resources: Scaling | None = None
    """scaling.* of every trial's TorchTrainer."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """train.seed of every trial, and the sampler's default seed."""
    storage: Annotated[str, Field(min_length=1)] | None = None
    """Where experiments go: a directory or URI (the CLI's --storage wins)."""
    optuna_storage: str | None = None
    """The trials' database: an Optuna RDB URL (default: SQLite kept with the experiment)."""
    points_to_evaluate: list[dict[str, Any]] | None = None
    """Points of the space (space key -> value) run first, in order."""
    tracking: Tracking | None = None
    """MLflow: a run per trial (default: the base experiment's tracking section)."""


STUDY_KEYS = tuple(StudyFile.__dataclass_fields__)
PARAM_KEYS = tuple(ParamSpec.__dataclass_fields__)


def expand_shorthands(data: dict) -> dict:
    """A copy of a study mapping with its shorthands spelled out."""
    out = dict(data)
    for key in ("sampler", "scheduler"):
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    scheduler = out.get("scheduler")
    if isinstance(scheduler, dict) and any(scheduler.get("name", "") is v for v in (None, False)):
        out["scheduler"] = {**scheduler, "name": "none"}  # `name: null` / `false`: none
    if isinstance(out.get("space"), dict):
        out["space"] = {
            k: {"type": "categorical", "choices": v} if isinstance(v, list) else v
            for k, v in out["space"].items()
        }
    return out


def study_schema() -> dict:
    """The JSON Schema of a study file (`deqray schema study`)."""
    out = json_schema(
        StudyFile,
        "deqray study",
        "A study (sweep) of deqray: deqray tune FILE; deqray schema study.",
    )
    # the shorthands a file may use, which `expand_shorthands` spells out
    props = out["properties"]
    for key, names in (("sampler", SAMPLER_NAMES), ("scheduler", SCHEDULER_NAMES)):
        props[key]["anyOf"].append({"enum": list(names)})  # `sampler: random`
    space = props["space"]
    space["additionalProperties"] = {
        "anyOf": [space["additionalProperties"], {"type": "array", "minItems": 1}]
    }
    return out


__all__ = [
    "PARAM_KEYS",
    "STUDY_KEYS",
    "ParamSpec",
    "SamplerSection",
    "SchedulerSpec",
    "StudyFile",
    "expand_shorthands",
    "study_schema",
]
