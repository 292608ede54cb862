"""Model presets by name: `build("mdeq-cifar-tiny")`, `presets()`.

A preset is a function returning a config dataclass; each config class
knows how to build its model (`config.build()`). `build` takes a preset
name, a config object, or a mapping with a `preset` key and overrides, so
that a YAML file or a sweep can name a preset and change some of its fields.
Unknown presets and keys fail with the nearest valid name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from deqray.core._errors import suggest

_PRESETS: dict[str, Callable[[], Any]] = {}
_FAMILIES: dict[str, type] = {}


def register_family(name: str, config_cls: type) -> type:
    """Declare a config dataclass (with a `build() -> nn.Module` method) as a model family."""
    if not dataclasses.is_dataclass(config_cls) or not hasattr(config_cls, "build"):
        raise TypeError(f"{config_cls!r} must be a dataclass with a build() method")
    _FAMILIES[name] = config_cls
    return config_cls


def register_preset(name: str, make_config: Callable[[], Any]) -> None:
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = make_config


def presets() -> list[str]:
    _load()
    return sorted(_PRESETS)


def preset_config(name: str) -> Any:
    _load()
    try:
        return _PRESETS[name]()
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}{suggest(name, _PRESETS)}; "
            f"presets: {', '.join(sorted(_PRESETS))}"
        ) from None


def make_config(spec: str | Mapping | Any, where: str = "model", **overrides) -> Any:
    """The config for a preset name, a mapping ({"preset": name, ...} or
    {"family": name, ...}), or a config object, with `overrides` applied.

    Overrides of a dict-valued field are merged into it (`deq={"f_thres": 20}`
    keeps the preset's other solver settings), and a dotted key reaches one
    entry of it (`**{"deq.f_thres": 20}`).
    """
    _load()
    if isinstance(spec, str):
        cfg = preset_config(spec)
    elif isinstance(spec, Mapping):
        spec = dict(spec)
        if "preset" in spec:
            cfg = preset_config(spec.pop("preset"))
        elif "family" in spec:
            fam = spec.pop("family")
            if fam not in _FAMILIES:
                raise ValueError(
                    f"{where}: unknown model family {fam!r}{suggest(str(fam), _FAMILIES)}; "
                    f"families: {', '.join(sorted(_FAMILIES))}"
                )
            cfg = _FAMILIES[fam]()
        else:
            raise ValueError(f"{where}: a model mapping needs a 'preset' or a 'family' key")
        overrides = {**spec, **overrides}
    elif dataclasses.is_dataclass(spec) and type(spec) in _FAMILIES.values():
        cfg = spec
    else:
        raise TypeError(
            f"{where}: expected a preset name, a mapping or a model config, got {spec!r}"
        )
    if overrides:
        names = [f.name for f in dataclasses.fields(cfg)]
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            # "deq.f_thres=20" reaches into a dict field
            head, _, rest = key.partition(".")
            if head not in names:
                raise ValueError(
                    f"{where}: unknown key {head!r} for {type(cfg).__name__}"
                    f"{suggest(head, names)}; valid keys: {', '.join(names)}"
                )
            current = changes.get(head, getattr(cfg, head))
            if rest:
                if not isinstance(current, dict):
                    raise ValueError(f"{where}: {head!r} is not a mapping, so {key!r} is invalid")
                value = {**current, rest: value}
            elif isinstance(current, dict) and isinstance(value, Mapping):
                value = {**current, **value}  # merge: keep the preset's other entries
            changes[head] = value
        cfg = dataclasses.replace(cfg, **changes)
    return cfg


def build(spec: str | Mapping | Any, where: str = "model", **overrides) -> nn.Module:
    """Build a model from a preset name, a mapping or a config (see `make_config`)."""
    return make_config(spec, where, **overrides).build()


def count_parameters(spec: str | Mapping | Any, **overrides) -> int:
    """Trainable parameters of a model, built on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        model = build(spec, **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def family_of(config: Any) -> str:
    """The registered family name of a model config object."""
    _load()
    for name, cls in _FAMILIES.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"{type(config).__name__} is not a registered model family")


def describe() -> list[dict]:
    """One row per preset: name, family, parameter count."""
    rows = []
    for name in presets():
        cfg = preset_config(name)
        rows.append({"preset": name, "family": family_of(cfg), "parameters": count_parameters(cfg)})
    return rows


def _load() -> None:
    # the model modules register their families and presets on import
    from deqray.models import mdeq, transformer  # noqa: F401
