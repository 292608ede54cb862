"""The shipped tasks' models: deqray.models presets, the experiment's `deq` section applied."""

from __future__ import annotations

from typing import Any

from deqray.config import ConfigError

SELECTORS: dict[str, type] = {"preset": str, "family": str}  # keys that choose the model


def preset_model(
    exp, family: str, task: str, mdeq_task: str | None = None, default: str = ""
) -> Any:
    """The model config of `exp.model` (a preset name and field overrides; `default`
    when empty) with `exp.deq` merged in; it must be of `family` (and an MDEQ of
    `mdeq_task`)."""
    from deqray.core import DEQConfig
    from deqray.models import make_config
    from deqray.models.registry import family_of

    if exp.deq:  # alone first, so that errors name this section's keys
        DEQConfig.build({k: v for k, v in exp.deq.items() if k != "pretrain_layers"}, where="deq")
    spec = dict(exp.model) or {"preset": default}
    _check_types(spec)
    cfg = make_config(spec, where="model")
    got = family_of(cfg)
    kind = getattr(cfg, "task", None)
    if got != family or (mdeq_task is not None and kind != mdeq_task):
        what = f"{got} ({kind})" if kind else got
        need = f"{family} ({mdeq_task})" if mdeq_task else family
        raise ConfigError(
            f"model: {_label(exp.model)} is a {what} model; task {task!r} trains {need} "
            f"models: {', '.join(presets_of(family, mdeq_task))}"
        )
    if exp.deq:
        cfg = make_config(cfg, where="deq", deq=dict(exp.deq))
    return cfg


def _check_types(spec: dict) -> None:
    """The model section's values against the preset's field types: what make_config's
    dataclasses.replace would let through and the model would fail on, named here."""
    import typing

    from deqray.config import check_value
    from deqray.models import make_config

    for key in SELECTORS:
        if key in spec and not isinstance(spec[key], str):
            raise ConfigError(f"model.{key}: expected a name (a string), got {spec[key]!r}")
    head = {k: spec[k] for k in SELECTORS if k in spec}
    try:
        hints = typing.get_type_hints(type(make_config(head, where="model")))
    except (ValueError, TypeError):
        return  # an unknown preset or family: make_config names it next
    for key, value in spec.items():
        if key in hints and key not in SELECTORS:
            spec[key] = check_value(value, hints[key], f"model.{key}")


def accepts(model: Any, family: str, mdeq_task: str | None = None) -> bool:
    """Whether a `model:` mapping names a model of `family` (and MDEQ task): what decides
    the task of an experiment that does not name one."""
    from deqray.models import make_config
    from deqray.models.registry import family_of

    spec = dict(model) if isinstance(model, dict) else {}
    head = {k: spec[k] for k in ("preset", "family", "task") if isinstance(spec.get(k), str)}
    try:
        cfg = make_config(head, where="model")
    except (ValueError, TypeError):
        return False
    return family_of(cfg) == family and (
        mdeq_task is None or getattr(cfg, "task", None) == mdeq_task
    )


def presets_of(family: str, mdeq_task: str | None = None) -> list[str]:
    from deqray.models import preset_config, presets
    from deqray.models.registry import family_of

    out = []
    for name in presets():
        cfg = preset_config(name)
        if family_of(cfg) == family and (mdeq_task is None or cfg.task == mdeq_task):
            out.append(name)
    return out


def _label(model: Any) -> str:
    if isinstance(model, dict) and "preset" in model:
        return f"preset {model['preset']!r}"
    return repr(model)
