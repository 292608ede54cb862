"""Study files: one YAML file describes a sweep, validated on load against the experiment schema.

    study = load_study("search_spaces/quickstart.yaml", ["trials=4", "optim.steps=120"])
    params = study.suggest(optuna_trial)      # define-by-run, conditional entries included
    cfg = study.experiment(params)            # the trial's validated Experiment
    sampler = study.make_sampler()            # TPE, NSGA-II, random or grid, seeded

A study file:

    base: markov-tiny                 # shipped config name, a path relative to this file,
                                      # or an inline experiment mapping
    overrides: {optim.steps: 300}     # dotted keys fixed for every trial
    objectives: {val_ppl: min}        # ordered; several make a multi-objective study
    space:
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      deq.f_thres: {type: int, low: 4, high: 30, step: 2}
      deq.grad: {type: categorical, choices: [implicit, phantom]}
      deq.b_thres: {type: int, low: 4, high: 40, when: {deq.grad: implicit}}
    sampler: {name: tpe, seed: 0}     # tpe | nsga2 | random | grid, plus the sampler's options
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}   # or {name: none}
    trials: 8
    concurrency: 2
    resources: {workers: 1, gpus_per_worker: 0}   # each trial's TorchTrainer (scaling.*)
    seed: 0                           # train.seed of every trial (and the sampler's default)
    storage: runs                     # where experiments go (the CLI's --storage wins)
    optuna_storage: postgresql+psycopg2://deqray@db:5432/optuna   # the trials' database
                                      # (any Optuna RDB URL; --optuna-storage wins; default
                                      # SQLite with the experiment: tune/optuna_storage.py)
    points_to_evaluate: [{optim.lr: 0.002, deq.f_thres: 20, deq.grad: implicit, deq.b_thres: 25}]

Everything is checked here, before Ray starts: a space key must be a config
key whose type fits the distribution, both bounds and every choice must make
a valid experiment, a condition must name an earlier entry and one of its
values. Errors name the study file and the entry, and suggest the nearest
valid name. A space entry is sampled only when its `when` holds (every
listed key has one of the listed values); its parents come earlier in the
space, so define-by-run sampling in file order always knows them.

Every trial trains with the same `train.seed`: trials then differ by their
hyperparameters only (same initial weights and data order where the shapes
allow), which is the comparison a sweep wants. Search over `train.seed` in
the space to measure seed noise instead.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from deqray.config import CONFIG_DIR, ConfigError, Experiment, _yaml, find_config, load_config
from deqray.core._errors import suggest

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"  # a source checkout's

DIRECTIONS = {"min": "minimize", "max": "maximize"}
PARAM_TYPES = ("int", "float", "categorical")
PARAM_KEYS = ("type", "low", "high", "step", "log", "choices", "when")
SAMPLERS = {  # name -> optuna.samplers class name
    "tpe": "TPESampler",
    "nsga2": "NSGAIISampler",
    "random": "RandomSampler",
    "grid": "GridSampler",
}
SCHEDULERS = ("asha", "none")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t", "brackets")
RESOURCE_KEYS = ("workers", "gpus_per_worker", "cpus_per_worker")  # -> scaling.*
STUDY_KEYS = (
    "name",
    "base",
    "overrides",
    "objectives",
    "space",
    "sampler",
    "scheduler",
    "trials",
    "concurrency",
    "resources",
    "seed",
    "storage",
    "optuna_storage",
    "points_to_evaluate",
)
SECTIONS = tuple(f.name for f in dataclasses.fields(Experiment) if f.name not in ("source", "task"))
# keys that change how many reports a trial makes (ASHA's time unit)
_LENGTH_KEYS = ("optim.steps", "optim.epochs", "train.eval_every", "train.stop_at_step")
_TOL = 1e-9


# --------------------------------------------------------------------------- #
# the parts
# --------------------------------------------------------------------------- #


@dataclass
class Param:
    """One space entry: a distribution over one dotted config key, maybe conditional."""

    name: str  # the dotted config key, also the Optuna parameter name
    type: str  # int | float | categorical
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)  # parent key -> allowed values

    def active(self, params: dict) -> bool:
        """Whether the entry is sampled, given the parameters sampled before it."""
        return all(k in params and _member(params[k], vs) for k, vs in self.when.items())

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return _member(value, self.choices)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.type == "int" and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        span = max(abs(self.low), abs(self.high), 1.0) * _TOL
        if not self.low - span <= value <= self.high + span:
            return False
        if self.step:
            k = (value - self.low) / self.step
            return abs(k - round(k)) <= 1e-6
        return True

    def distribution(self):
        """The optuna distribution (what `suggest` asks for)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def is_discrete(self) -> bool:
        return self.type in ("int", "categorical") or self.step is not None

    def grid(self) -> list:
        """Every value of a discrete entry (a grid sampler's axis)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is None:
            raise ValueError(f"{self.name}: a continuous float range has no grid")
        n = round((self.high - self.low) / self.step)
        return [_tidy(self.low + i * self.step) for i in range(n + 1)]

    def representatives(self) -> list:
        """The values that validation applies: both bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.type == "categorical":
            text = "categorical " + " | ".join(_show(c) for c in self.choices)
        else:
            text = f"{self.type} [{_show(self.low)}, {_show(self.high)}]"
            if self.step is not None:
                text += f" step {_show(self.step)}"
            if self.log:
                text += " log"
        if self.when:
            text += f"  (when {_condition(self)})"
        return text

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high)
            if self.step is not None:
                out["step"] = self.step
            if self.log:
                out["log"] = True
        if self.when:
            out["when"] = {k: vs[0] if len(vs) == 1 else list(vs) for k, vs in self.when.items()}
        return out


@dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | nsga2 | random | grid
    seed: int | None = None  # default: the study's seed
    options: dict = field(default_factory=dict)  # keyword arguments of the optuna sampler


@dataclass
class SchedulerSpec:
    """Tune's trial scheduler. ASHA's metric is the first objective, and its time
    unit the number of reports (`training_iteration`): one per evaluation."""

    name: str = "none"  # asha | none
    grace_period: int = 1
    reduction_factor: float = 4
    max_t: int | None = None  # default: the reports of a whole trial (None: unknown yet)
    brackets: int = 1


@dataclass
class Study:
    source: str  # the study file (or where a mapping came from)
    base: str  # the base config: a shipped name, a resolved path, or "<inline>"
    overrides: dict[str, Any]
    objectives: dict[str, str]  # ordered: metric -> "min" | "max"
    space: dict[str, Param]  # ordered: parents before the entries conditional on them
    sampler: SamplerSpec
    scheduler: SchedulerSpec
    trials: int
    concurrency: int
    resources: dict[str, Any]  # scaling.* of every trial
    seed: int  # train.seed of every trial
    points_to_evaluate: list[dict]
    name: str
    storage: str | None = None  # the experiments' root (local directory or URI)
    optuna_storage: str | None = None  # an Optuna RDB URL for the trials (None: SQLite)
    # the base config with overrides, resources and seed applied: every trial's start
    fixed: Experiment = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    base_config: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- objectives ------------------------------------------------------------------- #

    def metric_names(self) -> list[str]:
        return list(self.objectives)

    def modes(self) -> list[str]:
        """["min", "max", ...]: Tune's / OptunaSearch's modes, in objective order."""
        return list(self.objectives.values())

    def directions(self) -> list[str]:
        """["minimize", "maximize", ...]: optuna's directions, in objective order."""
        return [DIRECTIONS[d] for d in self.objectives.values()]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def has_conditions(self) -> bool:
        return any(p.when for p in self.space.values())

    # ---- sampling ----------------------------------------------------------------------- #

    def suggest(self, trial) -> dict[str, Any]:
        """Define-by-run sampling (OptunaSearch's `space`): the space in file order,
        an entry with `when` only where its condition holds (else left out)."""
        params: dict[str, Any] = {}
        for name, p in self.space.items():
            if not p.active(params):
                continue
            if p.type == "categorical":
                params[name] = trial.suggest_categorical(name, list(p.choices))
            elif p.type == "int":
                params[name] = trial.suggest_int(name, p.low, p.high, step=p.step or 1, log=p.log)
            else:
                params[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
        return params

    def grid_space(self) -> dict[str, list]:
        """The grid sampler's search space: every value of every entry."""
        return {name: p.grid() for name, p in self.space.items()}

    def make_sampler(self):
        """The optuna sampler, seeded (sampler.seed, else the study's seed).

        TPE over a space with conditional entries uses the multivariate TPE
        with the group decomposition (unless the options say otherwise): the
        joint model of each sub-space that trials share, instead of one
        independent model per parameter.
        """
        import optuna

        cls = getattr(optuna.samplers, SAMPLERS[self.sampler.name])
        kwargs = dict(self.sampler.options)
        kwargs["seed"] = self.sampler.seed if self.sampler.seed is not None else self.seed
        if self.sampler.name == "grid":
            kwargs["search_space"] = self.grid_space()
        if self.sampler.name == "tpe" and self.has_conditions:
            kwargs.setdefault("multivariate", True)
            if kwargs["multivariate"]:
                kwargs.setdefault("group", True)
        with warnings.catch_warnings():
            # `group` (and a few TPE options) are marked experimental since optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)

    def reference_points(self) -> list[dict]:
        """points_to_evaluate as given (OptunaSearch enqueues them as the first trials)."""
        return copy.deepcopy(self.points_to_evaluate)

    # ---- experiments ---------------------------------------------------------------------- #

    def experiment(self, params: dict | None = None) -> Experiment:
        """A trial's config: base + overrides + resources + seed + `params`, validated."""
        cfg = self.fixed.with_overrides(dict(params or {}), where=f"{self.source}: trial")
        cfg.source = self.fixed.source
        return cfg

    def reports_per_trial(self, steps_per_epoch: int | None = None) -> int | None:
        """Reports (evaluations) of a whole trial: ASHA's max_t. The most over the
        space where it searches the run's length. None for an epochs-based run
        until `steps_per_epoch` (from the data manifest) is given."""
        o, t = self.fixed.optim, self.fixed.train
        fixed = {
            "optim.steps": o.steps,
            "optim.epochs": o.epochs,
            "train.eval_every": t.eval_every,
            "train.stop_at_step": t.stop_at_step,
        }
        axes = [
            [(k, v) for v in self.space[k].representatives()]
            if k in self.space
            else [(k, fixed[k])]
            for k in _LENGTH_KEYS
        ]
        counts = [_reports(dict(combo), steps_per_epoch) for combo in itertools.product(*axes)]
        known = [c for c in counts if c is not None]
        return max(known) if known and len(known) == len(counts) else None

    # ---- display and persistence ------------------------------------------------------------ #

    def space_summary(self) -> list[str]:
        """One line per space entry (what `deqray tune` prints before it starts)."""
        width = max((len(k) for k in self.space), default=0)
        return [f"{k.ljust(width)}  {p.describe()}" for k, p in self.space.items()]

    def to_dict(self) -> dict:
        """A study mapping that `Study.from_dict` reads back, with the base config inline
        (so that a saved study needs neither its file nor its base file)."""
        sampler = {"name": self.sampler.name, **self.sampler.options}
        if self.sampler.seed is not None:
            sampler["seed"] = self.sampler.seed
        s = self.scheduler
        scheduler: dict[str, Any] = {"name": s.name}
        if s.name == "asha":
            scheduler.update(
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
                max_t=s.max_t,
                brackets=s.brackets,
            )
        out = {
            "name": self.name,
            "base": copy.deepcopy(self.base_config),
            "overrides": copy.deepcopy(self.overrides),
            "objectives": dict(self.objectives),
            "space": {k: p.to_dict() for k, p in self.space.items()},
            "sampler": sampler,
            "scheduler": scheduler,
            "trials": self.trials,
            "concurrency": self.concurrency,
            "resources": dict(self.resources),
            "seed": self.seed,
            "storage": self.storage,
            "optuna_storage": self.optuna_storage,
            "points_to_evaluate": self.reference_points(),
        }
        if "train.seed" in self.overrides:  # the seed came from there: give it once
            del out["seed"]
        return out

    @classmethod
    def from_dict(
        cls, data: dict, source: str = "study", overrides: dict | list[str] | None = None
    ) -> Study:
        """A validated study from a mapping (a parsed study file, or `to_dict()`)."""
        return _parse(copy.deepcopy(data), str(source), overrides)


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #


def shipped_studies() -> list[str]:
    """Names of the study files in a source checkout's search_spaces/ directory."""
    return sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))


def find_study(path_or_name: str | Path) -> Path:
    """A study file: a path, or the name of one in search_spaces/ (a source checkout)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    text = str(path_or_name)
    shipped = SEARCH_SPACES_DIR / f"{text}.yaml"
    if "/" not in text and not text.endswith((".yaml", ".yml")) and shipped.is_file():
        return shipped
    names = shipped_studies()
    hint = (
        f"; shipped studies: {', '.join(names)}"
        if names
        else f" (and no shipped studies in {SEARCH_SPACES_DIR}: not a source checkout)"
    )
    raise ConfigError(f"{text}: no such study file{suggest(p.stem, names)}{hint}")


def load_study(path: str | Path, overrides: dict | list[str] | None = None) -> Study:
    """Read and validate a study file.

    `overrides` ({"key": value} or ["key=value", ...], values read as YAML)
    change the study: a top-level key (`trials=4`, `name=x`), an entry of
    sampler / scheduler / resources / objectives (`sampler.name=random`,
    `scheduler.grace_period=1`), or an experiment key (`optim.steps=60`),
    which joins the study's `overrides` (fixed for every trial).
    """
    p = find_study(path)
    try:
        data = _yaml(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return _parse(data, str(p), overrides)


def _parse(data: Any, where: str, overrides: dict | list[str] | None) -> Study:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top, got {type(data).__name__}")
    data = _apply_study_overrides(data, overrides, where)
    for key in data:
        if key not in STUDY_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}{suggest(str(key), STUDY_KEYS)}; "
                f"valid keys: {', '.join(STUDY_KEYS)}"
            )
    base_dir = Path(where).parent if Path(where).is_file() else Path(".")
    name = data.get("name")
    if name is None:
        name = Path(where).stem
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"{where}: name: must be a plain directory name, got {name!r}")
    storage = data.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage):
        raise ConfigError(f"{where}: storage: expected a directory or URI, got {storage!r}")
    optuna_storage = data.get("optuna_storage")
    if optuna_storage is not None:
        check_db_url(optuna_storage, f"{where}: optuna_storage")

    # the experiment every trial starts from
    if "base" not in data:
        raise ConfigError(f"{where}: base: missing (a shipped config name, or a config file)")
    base_name, base_cfg = _load_base(data["base"], base_dir, where)
    overrides_ = _experiment_overrides(data.get("overrides"), where)
    fixed = _apply(base_cfg, overrides_, f"{where}: overrides")
    resources = data.get("resources") or {}
    if not isinstance(resources, dict):
        raise ConfigError(f"{where}: resources: expected a mapping, got {resources!r}")
    for key, value in resources.items():
        entry = f"{where}: resources.{key}"
        if key not in RESOURCE_KEYS:
            raise ConfigError(
                f"{entry}: unknown key {key!r}{suggest(str(key), RESOURCE_KEYS)}; "
                f"valid keys: {', '.join(RESOURCE_KEYS)}"
            )
        if f"scaling.{key}" in overrides_:
            raise ConfigError(f"{entry}: also given as overrides.scaling.{key}; give it once")
        fixed = _apply(fixed, {f"scaling.{key}": value}, entry)
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"{where}: seed: expected an int >= 0, got {seed!r}")
        if "train.seed" in overrides_:
            raise ConfigError(f"{where}: seed: also given as overrides.train.seed; give it once")
        fixed = _apply(fixed, {"train.seed": seed}, f"{where}: seed")
    seed = fixed.train.seed
    fixed.source = base_cfg.source
    fixed_keys = {
        **overrides_,
        **{f"scaling.{k}": v for k, v in resources.items()},
        **({"train.seed": seed} if data.get("seed") is not None else {}),
    }

    objectives = _objectives(data.get("objectives"), where, fixed, data.get("space"))
    space = _space(data.get("space"), where, fixed, fixed_keys)
    sampler = _sampler(data.get("sampler"), where, space, len(objectives))
    study = Study(
        source=where,
        base=base_name,
        overrides=overrides_,
        objectives=objectives,
        space=space,
        sampler=sampler,
        scheduler=SchedulerSpec(),  # below: its max_t needs the study
        trials=0,
        concurrency=1,
        resources=dict(resources),
        seed=seed,
        points_to_evaluate=[],
        name=name,
        storage=storage,
        optuna_storage=optuna_storage,
        fixed=fixed,
        base_config=base_cfg.to_dict(),
    )
    study.scheduler = _scheduler(data.get("scheduler"), where, study)
    study.trials = _trials(data.get("trials"), where, study)
    study.concurrency = _positive_int(data.get("concurrency", 1), f"{where}: concurrency")
    study.points_to_evaluate = _points(data.get("points_to_evaluate"), where, study)
    return study


def check_db_url(url: Any, entry: str) -> None:
    """A database URL in SQLAlchemy's syntax (what Optuna's RDB storage takes)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "e.g. postgresql+psycopg2://user@host:5432/db or sqlite:////abs/path.db"
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{entry}: expected a database URL ({example}), got {url!r}")
    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(f"{entry}: {url!r} is not a database URL ({example})") from None


def _apply_study_overrides(data: dict, overrides: dict | list | None, where: str) -> dict:
    if not overrides:
        return data
    if isinstance(overrides, (list, tuple)):
        from deqray.config import parse_overrides

        overrides = parse_overrides(list(overrides))
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if head in SECTIONS and rest:
            fixed = data.get("overrides")
            data["overrides"] = {**(fixed if isinstance(fixed, dict) else {}), key: value}
        elif head in ("sampler", "scheduler", "resources", "objectives") and rest:
            node = data.get(head)
            node = dict(node) if isinstance(node, dict) else {}
            node[rest] = value
            data[head] = node
        elif head in STUDY_KEYS and not rest:
            data[head] = value
        else:
            valid = [*STUDY_KEYS, *(f"{s}.<key>" for s in SECTIONS)]
            raise ConfigError(
                f"{where}: override {key!r}: not a study key or a dotted experiment key"
                f"{suggest(str(key), [*STUDY_KEYS, *SECTIONS])}; valid: {', '.join(valid)}"
            )
    return data


def _load_base(base: Any, base_dir: Path, where: str) -> tuple[str, Experiment]:
    if isinstance(base, dict):
        try:
            cfg = Experiment.from_dict(base, f"{where}: base")
        except ConfigError as e:
            raise ConfigError(f"{where}: base: {_strip(str(e), f'{where}: base')}") from None
        cfg.source = base.get("source")
        return base.get("source") or "<inline>", cfg
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{where}: base: expected a config name, a path or a mapping, got {base!r}"
        )
    local = base_dir / base
    target = str(local) if local.is_file() else base
    try:
        path = find_config(target)
        cfg = load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{where}: base: {e}") from None
    shipped = Path(path).resolve().parent == CONFIG_DIR.resolve()
    return (Path(path).stem if shipped and not local.is_file() else str(path)), cfg


def _experiment_overrides(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping of dotted keys, got {raw!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if "." not in key and isinstance(value, dict):  # {optim: {steps: 300}}
            for k, v in value.items():
                out[f"{key}.{k}"] = v
        elif "." not in key:
            raise ConfigError(
                f"{where}: overrides.{key}: expected a dotted key such as 'optim.steps'"
                f"{suggest(key, SECTIONS)}"
            )
        else:
            out[key] = value
    return out


def _objectives(raw: Any, where: str, fixed: Experiment, space: Any) -> dict:
    """The objectives, each a metric the base config's reports carry: the task's declared
    metrics (val_<name>) and the platform's (deqray.train.report)."""
    from deqray.train.report import EVALUATION, TRAINING, report_metrics, task_metrics

    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where}: objectives: expected a mapping such as {{val_ppl: min}}, got {raw!r}"
        )
    known = report_metrics(fixed)
    task = fixed.get_task().name
    out = {}
    for metric, direction in raw.items():
        entry = f"{where}: objectives.{metric}"
        if metric not in known:
            own = ", ".join(m.name for m in task_metrics(fixed))
            solver = ", ".join(m.name for m in [*EVALUATION, *TRAINING][:6])
            raise ConfigError(
                f"{entry}: unknown metric {metric!r}{suggest(str(metric), known)}; task "
                f"{task!r} reports {own}, and the solver's and the loop's ({solver}, ...)"
            )
        if not isinstance(direction, str) or direction not in DIRECTIONS:
            raise ConfigError(
                f"{entry}: direction must be min or max, got {direction!r}"
                f"{suggest(str(direction), DIRECTIONS)}"
            )
        if metric.startswith("val_sradius") and not fixed.train.eval_sradius:
            searched = isinstance(space, dict) and "train.eval_sradius" in space
            if not searched:
                raise ConfigError(
                    f"{entry}: the spectral radius is only measured with "
                    "train.eval_sradius: true (add it to overrides)"
                )
        out[str(metric)] = direction
    return out


# ---- the space -------------------------------------------------------------------------- #


def _space(raw: Any, where: str, fixed: Experiment, fixed_keys: dict) -> dict[str, Param]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: space: expected a mapping of dotted config keys, got {raw!r}")
    space: dict[str, Param] = {}
    for name, spec in raw.items():
        name = str(name)
        entry = f"{where}: space.{name}"
        try:
            hint = _key_hint(fixed, name)
        except _Unknown as e:
            raise ConfigError(f"{entry}: {e}") from None
        if name in fixed_keys:
            what = "seed" if name == "train.seed" else "overrides / resources"
            raise ConfigError(f"{entry}: also fixed by the study's {what}; give it once")
        p = _param(name, spec, entry)
        _check_fit(p, hint, entry)
        _check_when(p, space, [str(k) for k in raw][len(space) + 1 :], entry)
        space[name] = p
        # each bound / choice must make a valid experiment, its parents' conditions holding
        context = _context(p, space)
        for label, value in _labelled(p):
            problem = _try(fixed, {**context, name: value})
            if problem is not None:
                raise ConfigError(f"{entry}: {label} {_show(value)}: {problem}")
    return space


def _param(name: str, spec: Any, entry: str) -> Param:
    if isinstance(spec, list):  # shorthand: a list of choices
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{entry}: expected a mapping with type: int | float | categorical "
            f"(or a list of choices), got {spec!r}"
        )
    for key in spec:
        if key not in PARAM_KEYS:
            raise ConfigError(
                f"{entry}: unknown option {key!r}{suggest(str(key), PARAM_KEYS)}; "
                f"options: {', '.join(PARAM_KEYS)}"
            )
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(
            f"{entry}: type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}"
            f"{suggest(str(kind), PARAM_TYPES)}"
        )
    when = _when(spec.get("when"), entry)
    if kind == "categorical":
        for key in ("low", "high", "step", "log"):
            if key in spec:
                raise ConfigError(f"{entry}: {key} does not apply to a categorical (choices do)")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{entry}: choices: expected a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(
                    f"{entry}: choices: {c!r} is not a null, bool, number or string "
                    "(what optuna can store)"
                )
        for i, a in enumerate(choices):
            for b in choices[:i]:
                if a == b:  # 1 == 1.0 == true: optuna could not tell them apart either
                    raise ConfigError(f"{entry}: choices: duplicate {_show(a)} (and {_show(b)})")
        return Param(name, "categorical", choices=list(choices), when=when)
    if "choices" in spec:
        raise ConfigError(f"{entry}: choices apply to type: categorical only")
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{entry}: {key}: missing (a range needs low and high)")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    number = (lambda v: _is_int(v)) if kind == "int" else _is_number
    for key, v in (("low", low), ("high", high), ("step", step)):
        if (v is not None or key != "step") and not number(v):
            raise ConfigError(
                f"{entry}: {key}: expected {'an int' if kind == 'int' else 'a number'}, got {v!r}"
            )
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{entry}: {key}: must be finite, got {v!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{entry}: log: expected true or false, got {log!r}")
    if low >= high:
        raise ConfigError(f"{entry}: low must be < high, got low={_show(low)} high={_show(high)}")
    if log and low <= 0:
        raise ConfigError(f"{entry}: a log range needs low > 0, got low={_show(low)}")
    if step is not None:
        if step <= 0:
            raise ConfigError(f"{entry}: step must be > 0, got {_show(step)}")
        if log and (kind == "float" or step != 1):
            raise ConfigError(f"{entry}: log and step cannot be combined (optuna samples either)")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-6:
            raise ConfigError(
                f"{entry}: step {_show(step)} does not divide "
                f"high - low = {_show(_tidy(high - low))}"
            )
    if kind == "float":
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    elif step == 1:
        step = None
    return Param(name, kind, low=low, high=high, step=step, log=log, when=when)


def _when(raw: Any, entry: str) -> dict[str, list]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{entry}: when: expected a mapping such as {{deq.grad: implicit}}, got {raw!r}"
        )
    return {str(k): list(v) if isinstance(v, list) else [v] for k, v in raw.items()}


def _check_when(p: Param, space: dict[str, Param], later: list[str], entry: str) -> None:
    for parent, values in p.when.items():
        if parent == p.name:
            raise ConfigError(f"{entry}: when: an entry cannot depend on itself")
        if parent in later:
            raise ConfigError(
                f"{entry}: when: {parent} comes after {p.name} in the space; move it before "
                "(entries are sampled in file order, so a condition names an earlier one)"
            )
        if parent not in space:
            raise ConfigError(
                f"{entry}: when: {parent!r} is not an earlier entry of the space"
                f"{suggest(parent, space)} (a condition names a key sampled before it)"
            )
        if not values:
            raise ConfigError(f"{entry}: when.{parent}: an empty list never holds")
        for v in values:
            if not space[parent].contains(v):
                raise ConfigError(
                    f"{entry}: when.{parent}: {_show(v)} is not a value of {parent} "
                    f"({space[parent].describe()})"
                )


def _context(p: Param, space: dict[str, Param]) -> dict[str, Any]:
    """Parent values under which `p` is sampled (the first allowed value of each ancestor)."""
    out: dict[str, Any] = {}
    for parent, values in p.when.items():
        out.update(_context(space[parent], space))
        out[parent] = values[0]
    return out


def _labelled(p: Param, limit: int = 64) -> list[tuple[str, Any]]:
    """The values that validation applies: every choice; a range's bounds, and the
    values between of a discrete range (`limit` evenly spread ones at most)."""
    if p.type == "categorical":
        return [("choice", c) for c in p.choices]
    out = [("low", p.low), ("high", p.high)]
    if not p.is_discrete():
        return out
    step = p.step or 1
    n = round((p.high - p.low) / step)
    idx = range(1, n) if n <= limit else sorted({round(i * n / limit) for i in range(1, limit)})
    values = (p.low + i * step for i in idx)
    return out + [("value", _tidy(v) if p.type == "float" else v) for v in values]


def _check_fit(p: Param, hint: Any, entry: str) -> None:
    """A distribution must fit the key's type (choices are checked by applying them)."""
    if hint is _ANY or p.type == "categorical":
        return
    kinds = _kinds(hint)
    bool_only = kinds <= {bool, type(None)}
    if bool_only:
        raise ConfigError(
            f"{entry}: {p.name} is a bool setting: use type: categorical with choices [true, false]"
        )
    if p.type == "float" and float not in kinds:
        if int in kinds:
            raise ConfigError(f"{entry}: {p.name} is an int setting: use type: int")
        raise ConfigError(
            f"{entry}: {p.name} is a {_type_name(hint)} setting: a float range does not fit it "
            "(use type: categorical)"
        )
    if p.type == "int" and not kinds & {int, float}:
        raise ConfigError(
            f"{entry}: {p.name} is a {_type_name(hint)} setting: an int range does not fit it "
            "(use type: categorical)"
        )


# ---- the sampler and scheduler ---------------------------------------------------------- #


def _sampler(raw: Any, where: str, space: dict[str, Param], n_objectives: int) -> SamplerSpec:
    import optuna

    if raw is None:
        raw = {"name": "tpe"}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: sampler: expected a mapping such as {{name: tpe}}, got {raw!r}"
        )
    raw = dict(raw)
    name = raw.pop("name", "tpe")
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ConfigError(
            f"{where}: sampler.name: unknown sampler {name!r}{suggest(str(name), SAMPLERS)}; "
            f"samplers: {', '.join(SAMPLERS)}"
        )
    seed = raw.pop("seed", None)
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise ConfigError(f"{where}: sampler.seed: expected an int >= 0, got {seed!r}")
    cls = getattr(optuna.samplers, SAMPLERS[name])
    accepted = [k for k in inspect.signature(cls).parameters if k not in ("seed", "search_space")]
    for key in raw:
        if key not in accepted:
            extra = " (built from the space)" if key == "search_space" else ""
            raise ConfigError(
                f"{where}: sampler.{key}: not an option of optuna's {cls.__name__}{extra}"
                f"{suggest(str(key), accepted)}; options: {', '.join(accepted) or 'none'}"
            )
    if name == "grid":
        for key, p in space.items():
            if p.when:
                raise ConfigError(
                    f"{where}: space.{key}: the grid sampler takes no conditional entries "
                    "(its grid is the full product of the space)"
                )
            if not p.is_discrete():
                raise ConfigError(
                    f"{where}: space.{key}: the grid sampler needs discrete entries: "
                    "give this float range a step, or use categorical choices"
                )
    spec = SamplerSpec(name, seed, raw)
    # options of the wrong type or value fail here, not when the study starts
    probe = Study(
        source="",
        base="",
        overrides={},
        objectives={f"m{i}": "min" for i in range(n_objectives)},
        space=space,
        sampler=spec,
        scheduler=SchedulerSpec(),
        trials=1,
        concurrency=1,
        resources={},
        seed=0,
        points_to_evaluate=[],
        name="probe",
    )
    try:
        probe.make_sampler()
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{where}: sampler: optuna's {cls.__name__} refused the options: {e}"
        ) from None
    return spec


def _scheduler(raw: Any, where: str, study: Study) -> SchedulerSpec:
    if raw is None:
        raw = {"name": "none"}
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: scheduler: expected a mapping such as {{name: asha}}, got {raw!r}"
        )
    raw = dict(raw)
    name = raw.pop("name", "none")
    if name is None or name is False:
        name = "none"
    if name not in SCHEDULERS:
        raise ConfigError(
            f"{where}: scheduler.name: unknown scheduler {name!r}{suggest(str(name), SCHEDULERS)}; "
            f"schedulers: {', '.join(SCHEDULERS)}"
        )
    valid = ASHA_KEYS if name == "asha" else ()
    for key in raw:
        if key not in valid:
            hint = f"; options of asha: {', '.join(ASHA_KEYS)}" if name == "asha" else ""
            raise ConfigError(
                f"{where}: scheduler.{key}: not an option of scheduler {name!r}"
                f"{suggest(str(key), valid)}{hint}"
            )
    if name == "none":
        return SchedulerSpec("none")
    spec = SchedulerSpec("asha")
    if "grace_period" in raw:
        spec.grace_period = _positive_int(raw["grace_period"], f"{where}: scheduler.grace_period")
    if "reduction_factor" in raw:
        rf = raw["reduction_factor"]
        if not _is_number(rf) or rf < 2:
            raise ConfigError(f"{where}: scheduler.reduction_factor: must be >= 2, got {rf!r}")
        spec.reduction_factor = rf
    if "brackets" in raw:
        spec.brackets = _positive_int(raw["brackets"], f"{where}: scheduler.brackets")
    if raw.get("max_t") is not None:
        spec.max_t = _positive_int(raw["max_t"], f"{where}: scheduler.max_t")
    else:
        spec.max_t = study.reports_per_trial()
    if spec.max_t is not None and spec.grace_period > spec.max_t:
        raise ConfigError(
            f"{where}: scheduler.grace_period: {spec.grace_period} is more than the "
            f"{spec.max_t} reports of a whole trial (max_t): ASHA would never stop a trial"
        )
    return spec


def _trials(raw: Any, where: str, study: Study) -> int:
    if study.sampler.name == "grid":
        size = math.prod(len(p.grid()) for p in study.space.values())
        if raw is None:
            return size
        trials = _positive_int(raw, f"{where}: trials")
        if trials > size:
            raise ConfigError(
                f"{where}: trials: {trials} is more than the grid's {size} points "
                "(the grid sampler would repeat some)"
            )
        return trials
    if raw is None:
        raise ConfigError(f"{where}: trials: missing (how many trials the study runs)")
    return _positive_int(raw, f"{where}: trials")


def _points(raw: Any, where: str, study: Study) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: points_to_evaluate: expected a list of mappings, got {raw!r}")
    out = []
    for i, point in enumerate(raw):
        entry = f"{where}: points_to_evaluate[{i}]"
        if not isinstance(point, dict):
            raise ConfigError(f"{entry}: expected a mapping of space keys, got {point!r}")
        for key, value in point.items():
            p = study.space.get(key)
            if p is None:
                raise ConfigError(
                    f"{entry}.{key}: not a key of the space{suggest(str(key), study.space)}"
                )
            if not p.contains(value):
                raise ConfigError(f"{entry}.{key}: {_show(value)} is outside {p.describe()}")
            for parent, values in p.when.items():
                if parent not in point:
                    raise ConfigError(
                        f"{entry}.{key}: conditional on {parent}, which the point does not give"
                    )
                if not _member(point[parent], values) or not study.space[parent].active(point):
                    raise ConfigError(
                        f"{entry}.{key}: given, but its condition ({_condition(p)}) "
                        "does not hold for this point"
                    )
        problem = _try(study.fixed, point)
        if problem is not None:
            raise ConfigError(f"{entry}: {problem}")
        out.append(dict(point))
    return out


# --------------------------------------------------------------------------- #
# the Pareto front
# --------------------------------------------------------------------------- #


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> list[int]:
    """Indices (ascending) of the rows that no other row dominates.

    `objectives` maps each metric to "min" or "max" ("minimize"/"maximize"
    too). Row a dominates row b when a is at least as good in every
    objective and better in one; so equal rows do not dominate each other,
    and a duplicate of a front point is on the front too. A row lacking an
    objective, or with a value that is not a finite number, is never on the
    front (and dominates nothing).

    Sorting the rows lexicographically (every objective as a minimisation)
    puts any dominating row before the rows it dominates, so one pass that
    compares each row with the front found so far is enough; transitivity
    covers the rows already left out.
    """
    if not objectives:
        raise ValueError("pareto_front: no objectives")
    signs = []
    for key, d in objectives.items():
        if d in ("min", "minimize"):
            signs.append(1.0)
        elif d in ("max", "maximize"):
            signs.append(-1.0)
        else:
            raise ValueError(
                f"pareto_front: objective {key}: direction must be min or max, got {d!r}"
            )
    keys = list(objectives)
    points: list[tuple[tuple[float, ...], int]] = []
    for i, row in enumerate(rows):
        values = []
        for key, sign in zip(keys, signs, strict=True):
            v = row.get(key) if isinstance(row, dict) else None
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                break
            values.append(sign * float(v))
        else:
            points.append((tuple(values), i))
    points.sort()
    front: list[tuple[tuple[float, ...], int]] = []
    for values, i in points:
        dominated = any(
            all(a <= b for a, b in zip(f, values, strict=True)) and f != values for f, _ in front
        )
        if not dominated:
            front.append((values, i))
    return sorted(i for _, i in front)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


class _Unknown(Exception):
    pass


_ANY = object()  # a free entry (a mapping's key): no type to check


def _key_hint(cfg: Experiment, key: str) -> Any:
    """The type hint of a dotted config key (_ANY inside free mappings); _Unknown if none."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise _Unknown(
            f"expected a dotted config key such as 'optim.lr'{suggest(key, SECTIONS)}; "
            f"sections: {', '.join(SECTIONS)}"
        )
    head, rest = parts[0], parts[1:]
    if head == "deq":
        from deqray.core import DEQConfig

        return _in_dataclass(DEQConfig, rest, "deq", key)
    if head == "model":
        selectors = getattr(cfg.get_task(), "model_selectors", {})
        if len(rest) == 1 and rest[0] in selectors:
            return selectors[rest[0]]
        return _in_dataclass(type(cfg.model_config()), rest, "model", key)
    if head not in SECTIONS:
        raise _Unknown(
            f"unknown key {key!r}: no section {head!r}{suggest(head, SECTIONS)}; "
            f"sections: {', '.join(SECTIONS)}"
        )
    if head == "data":  # the task's own section
        return _in_dataclass(cfg.get_task().data_section, rest, head, key)
    return _in_dataclass(typing.get_type_hints(Experiment)[head], rest, head, key)


def _in_dataclass(cls: type, parts: list[str], prefix: str, key: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    name = parts[0]
    if name not in names:
        raise _Unknown(
            f"unknown key {key!r}{suggest(name, names)}; valid keys of {prefix}: {', '.join(names)}"
        )
    hint = typing.get_type_hints(cls)[name]
    if len(parts) == 1:
        return hint
    if dataclasses.is_dataclass(hint):
        return _in_dataclass(hint, parts[1:], f"{prefix}.{name}", key)
    if dict in _kinds(hint):
        return _ANY  # e.g. data.options.tokens, deq.f_solver_options.m
    raise _Unknown(f"{prefix}.{name} is not a section, so {key!r} is not a key")


def _kinds(hint: Any) -> set:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(hint)))
    if origin is Literal:
        return {type(a) for a in typing.get_args(hint)}
    if hint is type(None):
        return {type(None)}
    return {origin or hint}


def _type_name(hint: Any) -> str:
    names = sorted(getattr(k, "__name__", str(k)).replace("NoneType", "null") for k in _kinds(hint))
    return " | ".join(names)


def _try(cfg: Experiment, values: dict) -> str | None:
    """None if the overrides make a valid experiment, else the config's complaint."""
    where = "<study>"
    try:
        cfg.with_overrides(values, where=where)
    except ConfigError as e:
        msg = str(e)
        for k, v in values.items():
            msg = _strip(msg, f"override {k}={v!r}")
        return _strip(msg, where)
    return None


def _apply(cfg: Experiment, values: dict, entry: str) -> Experiment:
    problem = _try(cfg, values)
    if problem is not None:
        raise ConfigError(f"{entry}: {problem}")
    out = cfg.with_overrides(values)
    out.source = cfg.source
    return out


def _strip(msg: str, prefix: str) -> str:
    return msg[len(prefix) + 2 :] if msg.startswith(prefix + ": ") else msg


def _reports(values: dict, steps_per_epoch: int | None) -> int | None:
    steps, epochs = values["optim.steps"], values["optim.epochs"]
    if steps is not None:
        total = int(steps)
    elif epochs is not None and steps_per_epoch:
        total = math.ceil(epochs * steps_per_epoch)
    else:
        return None
    stop = min(total, values["train.stop_at_step"] or total)
    return max(1, math.ceil(stop / int(values["train.eval_every"])))


def _condition(p: Param) -> str:
    return " and ".join(
        f"{k} = {_show(vs[0])}" if len(vs) == 1 else f"{k} in [{', '.join(map(_show, vs))}]"
        for k, vs in p.when.items()
    )


def _member(value: Any, choices: list) -> bool:
    """`value in choices`, except that true is not 1 and 1 is not true."""
    return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive_int(v: Any, entry: str) -> int:
    if not _is_int(v) or v < 1:
        raise ConfigError(f"{entry}: expected an int >= 1, got {v!r}")
    return int(v)


def _tidy(x: float) -> float:
    return float(f"{x:.12g}")


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


__all__ = [
    "Param",
    "SamplerSpec",
    "SchedulerSpec",
    "Study",
    "find_study",
    "load_study",
    "pareto_front",
    "shipped_studies",
]
