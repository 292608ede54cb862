"""The study's optuna sampler and Tune scheduler: checked against the space, then built.

The study file's schema (study_schema.py) has checked the names, seeds and the
scheduler's bounds; what is left needs optuna or the space: a sampler option
must be a keyword of its class (and one the class takes by value), the grid
sampler needs a discrete, unconditional space, and ASHA's grace period must
fit in the reports of a whole trial.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from deqray.config import ConfigError
from deqray.core._errors import suggest
from deqray.tune.space import Param
from deqray.tune.study_schema import SamplerSection, SchedulerSpec

SAMPLERS = {  # name -> optuna.samplers class name
    "tpe": "TPESampler",
    "nsga2": "NSGAIISampler",
    "random": "RandomSampler",
    "grid": "GridSampler",
}


@dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | nsga2 | random | grid
    seed: int | None = None  # default: the study's seed
    options: dict = field(default_factory=dict)  # keyword arguments of the optuna sampler


def make_sampler(spec: SamplerSpec, space: dict[str, Param], seed: int):
    """The optuna sampler, seeded (spec.seed, else `seed`).

    TPE over a space with conditional entries uses the multivariate TPE
    with the group decomposition (unless the options say otherwise): the
    joint model of each sub-space that trials share, instead of one
    independent model per parameter.
    """
    import optuna

    cls = getattr(optuna.samplers, SAMPLERS[spec.name])
    kwargs = dict(spec.options)
    kwargs["seed"] = spec.seed if spec.seed is not None else seed
    if spec.name == "grid":
        kwargs["search_space"] = {name: p.grid() for name, p in space.items()}
    if spec.name == "tpe" and any(p.when for p in space.values()):
        kwargs.setdefault("multivariate", True)
        if kwargs["multivariate"]:
            kwargs.setdefault("group", True)
    with warnings.catch_warnings():
        # `group` (and a few TPE options) are marked experimental since optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**kwargs)


def check_sampler(
    raw: dict, section: SamplerSection, where: str, space: dict[str, Param]
) -> SamplerSpec:
    """The sampler of a study file: `section` validated by the schema, `raw` the file's
    mapping (its keys beyond name and seed are the sampler class's options)."""
    import optuna

    options = {k: v for k, v in raw.items() if k not in ("name", "seed")}
    cls = getattr(optuna.samplers, SAMPLERS[section.name])
    accepted = [k for k in inspect.signature(cls).parameters if k not in ("seed", "search_space")]
    for key in options:
        if key not in accepted:
            extra = " (built from the space)" if key == "search_space" else ""
            raise ConfigError(
                f"{where}: sampler.{key}: not an option of optuna's {cls.__name__}{extra}"
                f"{suggest(str(key), accepted)}; options: {', '.join(accepted) or 'none'}"
            )
    if section.name == "grid":
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
    spec = SamplerSpec(section.name, section.seed, options)
    try:  # options of the wrong type or value fail here, not when the study starts
        make_sampler(spec, space, seed=0)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{where}: sampler: optuna's {cls.__name__} refused the options: {e}"
        ) from None
    return spec


def check_scheduler(
    raw: dict, spec: SchedulerSpec, where: str, reports_per_trial: Callable[[], int | None]
) -> SchedulerSpec:
    """The scheduler of a study file: `spec` validated by the schema, `raw` the file's
    mapping (ASHA's options are no scheduler's but ASHA's)."""
    if spec.name == "none":
        for key in raw:
            if key != "name":
                raise ConfigError(
                    f"{where}: scheduler.{key}: not an option of scheduler 'none' "
                    "(the options are ASHA's: name: asha)"
                )
        return SchedulerSpec("none")
    if spec.max_t is None:
        spec.max_t = reports_per_trial()
    if spec.max_t is not None and spec.grace_period > spec.max_t:
        raise ConfigError(
            f"{where}: scheduler.grace_period: {spec.grace_period} is more than the "
            f"{spec.max_t} reports of a whole trial (max_t): ASHA would never stop a trial"
        )
    return spec


__all__ = ["SAMPLERS", "SamplerSpec", "check_sampler", "check_scheduler", "make_sampler"]
