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
    tracking: {mlflow: {uri: http://mlflow:5000}}   # an MLflow run per trial (deqray/tracking.py)

The parts, each in its own module: the file's schema (study_schema.py:
keys, types, bounds; `deqray schema study`), the space (space.py: entries
checked against the experiment, define-by-run sampling), the sampler and the
scheduler (sampler.py), the Pareto front (pareto.py). This module reads a
file, checks what needs the experiment (the base, overrides, objectives
against the task's metrics), and holds the result: `Study`. Errors name the
study file and the entry, and suggest the nearest valid name.

Every trial trains with the same `train.seed`: trials then differ by their
hyperparameters only (same initial weights and data order where the shapes
allow), which is the comparison a sweep wants. Search over `train.seed` in
the space to measure seed noise instead.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deqray.config import (
    CONFIG_DIR,
    ConfigError,
    Experiment,
    Tracking,
    _set_dotted,
    _yaml,
    find_config,
    load_config,
    parse_section,
)
from deqray.core._errors import suggest
from deqray.schema import validate
from deqray.tune.pareto import pareto_front
from deqray.tune.sampler import SamplerSpec, check_sampler, check_scheduler, make_sampler
from deqray.tune.space import (
    SECTIONS,
    Param,
    build_space,
    check_points,
    strip_prefix,
    suggest_params,
    try_overrides,
)
from deqray.tune.study_schema import (
    STUDY_KEYS,
    SamplerSection,
    SchedulerSpec,
    StudyFile,
    expand_shorthands,
)

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"  # a source checkout's

DIRECTIONS = {"min": "minimize", "max": "maximize"}
# keys that change how many reports a trial makes (ASHA's time unit)
_LENGTH_KEYS = ("optim.steps", "optim.epochs", "train.eval_every", "train.stop_at_step")


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
    # MLflow: the study file's `tracking` section, else the base experiment's
    tracking: Tracking = field(default_factory=Tracking)
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
        return suggest_params(self.space, trial)

    def grid_space(self) -> dict[str, list]:
        """The grid sampler's search space: every value of every entry."""
        return {name: p.grid() for name, p in self.space.items()}

    def make_sampler(self):
        """The optuna sampler, seeded (sampler.seed, else the study's seed)."""
        return make_sampler(self.sampler, self.space, self.seed)

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
        if self.fixed is None or self.tracking != self.fixed.tracking:  # the study's own
            out["tracking"] = dataclasses.asdict(self.tracking)
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
    data = expand_shorthands(_apply_study_overrides(data, overrides, where))
    spec: StudyFile = validate(StudyFile, data, where=where)
    name = spec.name if spec.name is not None else Path(where).stem
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"{where}: name: must be a plain directory name, got {name!r}")
    if spec.optuna_storage is not None:
        check_db_url(spec.optuna_storage, f"{where}: optuna_storage")

    # the experiment every trial starts from
    base_dir = Path(where).parent if Path(where).is_file() else Path(".")
    base_name, base_cfg = _load_base(spec.base, base_dir, where)
    overrides_ = _experiment_overrides(spec.overrides or {}, where)
    fixed = _apply(base_cfg, overrides_, f"{where}: overrides")
    resources = dict(data.get("resources") or {})  # the keys given (the schema checked them)
    for key, value in resources.items():
        entry = f"{where}: resources.{key}"
        if f"scaling.{key}" in overrides_:
            raise ConfigError(f"{entry}: also given as overrides.scaling.{key}; give it once")
        fixed = _apply(fixed, {f"scaling.{key}": value}, entry)
    if spec.seed is not None:
        if "train.seed" in overrides_:
            raise ConfigError(f"{where}: seed: also given as overrides.train.seed; give it once")
        fixed = _apply(fixed, {"train.seed": spec.seed}, f"{where}: seed")
    fixed.source = base_cfg.source
    fixed_keys = {
        **overrides_,
        **{f"scaling.{k}": v for k, v in resources.items()},
        **({"train.seed": spec.seed} if spec.seed is not None else {}),
    }

    objectives = _objectives(spec.objectives, where, fixed, spec.space)
    space = build_space(spec.space, where, fixed, fixed_keys)
    sampler = check_sampler(
        data.get("sampler") or {}, spec.sampler or SamplerSection(), where, space
    )
    study = Study(
        source=where,
        base=base_name,
        overrides=overrides_,
        objectives=objectives,
        space=space,
        sampler=sampler,
        scheduler=SchedulerSpec(),  # below: its max_t needs the study
        trials=0,
        concurrency=spec.concurrency,
        resources=resources,
        seed=fixed.train.seed,
        points_to_evaluate=[],
        name=name,
        storage=spec.storage,
        optuna_storage=spec.optuna_storage,
        tracking=_tracking(data, where, fixed, overrides_),
        fixed=fixed,
        base_config=base_cfg.to_dict(),
    )
    study.scheduler = check_scheduler(
        data.get("scheduler") or {},
        spec.scheduler or SchedulerSpec(),
        where,
        study.reports_per_trial,
    )
    study.trials = _trials(spec.trials, where, study)
    study.points_to_evaluate = check_points(spec.points_to_evaluate or [], where, space, fixed)
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
        if head == "tracking" and rest and isinstance(data.get("tracking"), dict):
            _set_dotted(data, str(key), value, where)  # the study's own section
        elif head in SECTIONS and rest:
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


def _tracking(data: dict, where: str, fixed: Experiment, overrides: dict) -> Tracking:
    """The study's `tracking` section, or the base experiment's (its file or overrides).
    Each trial's rank 0 logs to it (deqray/tracking.py), whatever the base says."""
    if "tracking" not in data:
        return copy.deepcopy(fixed.tracking)
    given = [k for k in overrides if k == "tracking" or k.startswith("tracking.")]
    if given:
        raise ConfigError(f"{where}: tracking: also given as overrides.{given[0]}; give it once")
    tracking = parse_section(Tracking, data["tracking"], "tracking", where)
    problem = tracking.mlflow.problem()
    if problem is not None:
        raise ConfigError(f"{where}: {problem[0]}: {problem[1]}")
    return tracking


def _load_base(base: Any, base_dir: Path, where: str) -> tuple[str, Experiment]:
    if isinstance(base, dict):
        try:
            cfg = Experiment.from_dict(base, f"{where}: base")
        except ConfigError as e:
            raise ConfigError(f"{where}: base: {strip_prefix(str(e), f'{where}: base')}") from None
        cfg.source = base.get("source")
        return base.get("source") or "<inline>", cfg
    if not base:
        raise ConfigError(f"{where}: base: expected a config name, a path or a mapping, got ''")
    local = base_dir / base
    target = str(local) if local.is_file() else base
    try:
        path = find_config(target)
        cfg = load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{where}: base: {e}") from None
    shipped = Path(path).resolve().parent == CONFIG_DIR.resolve()
    return (Path(path).stem if shipped and not local.is_file() else str(path)), cfg


def _experiment_overrides(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """{dotted key: value}, from dotted keys or sections ({optim: {steps: 300}})."""
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


def _objectives(raw: dict[str, str], where: str, fixed: Experiment, space: dict) -> dict:
    """The objectives, each a metric the base config's reports carry: the task's declared
    metrics (val_<name>) and the platform's (deqray.train.report)."""
    from deqray.train.report import EVALUATION, TRAINING, report_metrics, task_metrics

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
        if metric.startswith("val_sradius") and not fixed.train.eval_sradius:
            if "train.eval_sradius" not in space:
                raise ConfigError(
                    f"{entry}: the spectral radius is only measured with "
                    "train.eval_sradius: true (add it to overrides)"
                )
        out[str(metric)] = direction
    return out


def _trials(raw: int | None, where: str, study: Study) -> int:
    if study.sampler.name == "grid":
        size = math.prod(len(p.grid()) for p in study.space.values())
        if raw is not None and raw > size:
            raise ConfigError(
                f"{where}: trials: {raw} is more than the grid's {size} points "
                "(the grid sampler would repeat some)"
            )
        return size if raw is None else raw
    if raw is None:
        raise ConfigError(f"{where}: trials: missing (how many trials the study runs)")
    return raw


def _apply(cfg: Experiment, values: dict, entry: str) -> Experiment:
    problem = try_overrides(cfg, values)
    if problem is not None:
        raise ConfigError(f"{entry}: {problem}")
    out = cfg.with_overrides(values)
    out.source = cfg.source
    return out


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


__all__ = [
    "Param",
    "SamplerSpec",
    "SchedulerSpec",
    "Study",
    "check_db_url",
    "find_study",
    "load_study",
    "pareto_front",
    "shipped_studies",
]
