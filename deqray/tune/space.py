"""A study's space: its entries (`Param`), their checks against the experiment, and sampling.

Each entry is checked before Ray starts: its key must be an experiment key
whose type fits the distribution (`accepts`, the schema's own rule), both
bounds and every choice (and the values between of a discrete range) must
make a valid experiment, and a `when` condition must name an earlier entry
and one of its values. An entry is sampled only where its condition holds
(every listed key has one of the listed values); its parents come earlier in
the space, so define-by-run sampling in file order always knows them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from deqray.config import ConfigError, Experiment
from deqray.core._errors import suggest
from deqray.schema import accepts, field_types, type_name, unwrap
from deqray.tune.study_schema import ParamSpec

SECTIONS = tuple(f for f in field_types(Experiment) if f not in ("source", "task"))
_TOL = 1e-9


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
        return all(k in params and member(params[k], vs) for k, vs in self.when.items())

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return member(value, self.choices)
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
        return [tidy(self.low + i * self.step) for i in range(n + 1)]

    def representatives(self) -> list:
        """The values that validation applies: both bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        if self.type == "categorical":
            text = "categorical " + " | ".join(show(c) for c in self.choices)
        else:
            text = f"{self.type} [{show(self.low)}, {show(self.high)}]"
            if self.step is not None:
                text += f" step {show(self.step)}"
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


def suggest_params(space: dict[str, Param], trial) -> dict[str, Any]:
    """Define-by-run sampling (OptunaSearch's `space`): the space in file order, an entry
    with `when` only where its condition holds (else left out)."""
    params: dict[str, Any] = {}
    for name, p in space.items():
        if not p.active(params):
            continue
        if p.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.type == "int":
            params[name] = trial.suggest_int(name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            params[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return params


# --------------------------------------------------------------------------- #
# building and checking the space
# --------------------------------------------------------------------------- #


def build_space(
    specs: dict[str, ParamSpec], where: str, fixed: Experiment, fixed_keys: dict
) -> dict[str, Param]:
    """The checked space from the file's validated entries (in file order)."""
    space: dict[str, Param] = {}
    order = list(specs)
    for name, spec in specs.items():
        entry = f"{where}: space.{name}"
        try:
            hint = key_type(fixed, name)
        except KeyError as e:
            raise ConfigError(f"{entry}: {e.args[0]}") from None
        if name in fixed_keys:
            what = "seed" if name == "train.seed" else "overrides / resources"
            raise ConfigError(f"{entry}: also fixed by the study's {what}; give it once")
        p = _param(name, spec, entry)
        _check_fit(p, hint, entry)
        _check_when(p, space, order[len(space) + 1 :], entry)
        space[name] = p
        # each bound / choice must make a valid experiment, its parents' conditions holding
        context = _context(p, space)
        for label, value in _labelled(p):
            problem = try_overrides(fixed, {**context, name: value})
            if problem is not None:
                raise ConfigError(f"{entry}: {label} {show(value)}: {problem}")
    return space


def check_points(
    points: list[dict], where: str, space: dict[str, Param], fixed: Experiment
) -> list[dict]:
    """points_to_evaluate, each a point of the space that makes a valid experiment."""
    for i, point in enumerate(points):
        entry = f"{where}: points_to_evaluate[{i}]"
        for key, value in point.items():
            p = space.get(key)
            if p is None:
                raise ConfigError(
                    f"{entry}.{key}: not a key of the space{suggest(str(key), space)}"
                )
            if not p.contains(value):
                raise ConfigError(f"{entry}.{key}: {show(value)} is outside {p.describe()}")
            for parent, values in p.when.items():
                if parent not in point:
                    raise ConfigError(
                        f"{entry}.{key}: conditional on {parent}, which the point does not give"
                    )
                if not member(point[parent], values) or not space[parent].active(point):
                    raise ConfigError(
                        f"{entry}.{key}: given, but its condition ({_condition(p)}) "
                        "does not hold for this point"
                    )
        problem = try_overrides(fixed, point)
        if problem is not None:
            raise ConfigError(f"{entry}: {problem}")
    return [dict(point) for point in points]


def key_type(cfg: Experiment, key: str) -> Any:
    """The annotation of a dotted experiment key (Any inside a free mapping, such as
    data.options.tokens); KeyError with the complaint where there is no such key."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise KeyError(
            f"expected a dotted config key such as 'optim.lr'{suggest(key, SECTIONS)}; "
            f"sections: {', '.join(SECTIONS)}"
        )
    head, rest = parts[0], parts[1:]
    if head == "deq":
        from deqray.core import DEQConfig

        return _in_section(DEQConfig, rest, head, key)
    if head == "model":
        selectors = getattr(cfg.get_task(), "model_selectors", {})
        if len(rest) == 1 and rest[0] in selectors:
            return selectors[rest[0]]
        return _in_section(type(cfg.model_config()), rest, head, key)
    if head not in SECTIONS:
        raise KeyError(
            f"unknown key {key!r}: no section {head!r}{suggest(head, SECTIONS)}; "
            f"sections: {', '.join(SECTIONS)}"
        )
    section = type(cfg.data) if head == "data" else field_types(Experiment)[head]
    return _in_section(section, rest, head, key)


def _in_section(cls: Any, parts: list[str], prefix: str, key: str) -> Any:
    fields = field_types(cls, bounds=False)  # the type only: the bounds are the experiment's
    name = parts[0]
    if name not in fields:
        raise KeyError(
            f"unknown key {key!r}{suggest(name, fields)}; "
            f"valid keys of {prefix}: {', '.join(fields)}"
        )
    hint = fields[name]
    dotted = f"{prefix}.{name}"
    if len(parts) == 1:
        return hint
    if dataclasses.is_dataclass(unwrap(hint)):
        return _in_section(unwrap(hint), parts[1:], dotted, key)
    if accepts(hint, {}):
        return Any  # a free mapping: data.options.tokens, deq.f_solver_options.m
    raise KeyError(f"{dotted} is not a section, so {key!r} is not a key")


def _param(name: str, spec: ParamSpec, entry: str) -> Param:
    """The entry's distribution: what depends on its type (the schema checked the rest)."""
    when = {k: list(v) if isinstance(v, list) else [v] for k, v in (spec.when or {}).items()}
    if spec.type == "categorical":
        for key in ("low", "high", "step", "log"):
            if getattr(spec, key) not in (None, False):
                raise ConfigError(f"{entry}: {key} does not apply to a categorical (choices do)")
        if spec.choices is None:
            raise ConfigError(f"{entry}: choices: missing (a categorical needs its values)")
        for i, a in enumerate(spec.choices):
            for b in spec.choices[:i]:
                if a == b:  # 1 == 1.0 == true: optuna could not tell them apart either
                    raise ConfigError(f"{entry}: choices: duplicate {show(a)} (and {show(b)})")
        return Param(name, "categorical", choices=list(spec.choices), when=when)
    if spec.choices is not None:
        raise ConfigError(f"{entry}: choices apply to type: categorical only")
    kind, low, high, step, log = spec.type, spec.low, spec.high, spec.step, spec.log
    for key, v in (("low", low), ("high", high)):
        if v is None:
            raise ConfigError(f"{entry}: {key}: missing (a range needs low and high)")
    for key, v in (("low", low), ("high", high), ("step", step)):
        if kind == "int" and v is not None and not isinstance(v, int):
            raise ConfigError(f"{entry}: {key}: expected an int, got {v!r}")
    if low >= high:
        raise ConfigError(f"{entry}: low must be < high, got low={show(low)} high={show(high)}")
    if log and low <= 0:
        raise ConfigError(f"{entry}: a log range needs low > 0, got low={show(low)}")
    if step is not None:
        if step <= 0:
            raise ConfigError(f"{entry}: step must be > 0, got {show(step)}")
        if log and (kind == "float" or step != 1):
            raise ConfigError(f"{entry}: log and step cannot be combined (optuna samples either)")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-6:
            raise ConfigError(
                f"{entry}: step {show(step)} does not divide high - low = {show(tidy(high - low))}"
            )
    if kind == "float":
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    elif step == 1:
        step = None
    return Param(name, kind, low=low, high=high, step=step, log=log, when=when)


def _check_fit(p: Param, hint: Any, entry: str) -> None:
    """A range must fit the key's type, by the schema's own rule (choices are checked by
    applying them)."""
    if hint is Any or p.type == "categorical":
        return
    if accepts(hint, True) and not accepts(hint, 1):
        raise ConfigError(
            f"{entry}: {p.name} is a bool setting: use type: categorical with choices [true, false]"
        )
    if p.type == "float" and not accepts(hint, 0.5):
        if accepts(hint, 1):
            raise ConfigError(f"{entry}: {p.name} is an int setting: use type: int")
        raise ConfigError(
            f"{entry}: {p.name} is a {type_name(hint)} setting: a float range does not fit it "
            "(use type: categorical)"
        )
    if p.type == "int" and not accepts(hint, 1):
        raise ConfigError(
            f"{entry}: {p.name} is a {type_name(hint)} setting: an int range does not fit it "
            "(use type: categorical)"
        )


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
                    f"{entry}: when.{parent}: {show(v)} is not a value of {parent} "
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
    return out + [("value", tidy(v) if p.type == "float" else v) for v in values]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def try_overrides(cfg: Experiment, values: dict) -> str | None:
    """None if the overrides make a valid experiment, else the config's complaint."""
    where = "<study>"
    try:
        cfg.with_overrides(values, where=where)
    except ConfigError as e:
        msg = str(e)
        for k, v in values.items():
            msg = strip_prefix(msg, f"override {k}={v!r}")
        return strip_prefix(msg, where)
    return None


def strip_prefix(msg: str, prefix: str) -> str:
    return msg[len(prefix) + 2 :] if msg.startswith(prefix + ": ") else msg


def _condition(p: Param) -> str:
    return " and ".join(
        f"{k} = {show(vs[0])}" if len(vs) == 1 else f"{k} in [{', '.join(map(show, vs))}]"
        for k, vs in p.when.items()
    )


def member(value: Any, choices: list) -> bool:
    """`value in choices`, except that true is not 1 and 1 is not true."""
    return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)


def tidy(x: float) -> float:
    return float(f"{x:.12g}")


def show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


__all__ = ["Param", "build_space", "check_points", "key_type", "suggest_params"]
