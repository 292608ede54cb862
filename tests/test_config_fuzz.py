"""Bad experiment and study files, fuzzed (hypothesis): only deqray's ConfigError, naming a key.

Inputs are shipped configs and study files with random mutations (a value
replaced by one of another type, a key deleted, renamed or added, a section
replaced by a scalar), whole random mappings, random override strings, and
random file text. Whatever comes in, `load_config`, `Experiment.from_dict`,
`parse_overrides`, `load_study` and `Study.from_dict` either return a
validated object or raise ConfigError whose message names where the input
came from and a key (of the input or of the schema). Any other exception is
a bug: an input the checks did not foresee.

The cases are derandomized (the same ones every run, so CI is reproducible)
and no example database is written.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from deqray.config import (
    CONFIG_DIR,
    ConfigError,
    Experiment,
    load_config,
    parse_overrides,
    shipped_configs,
)
from deqray.tune.study import SEARCH_SPACES_DIR, Study, load_study

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.generate, Phase.shrink],  # "explain" re-runs failures for minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def schema_keys(cls: type, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass, and every leaf name."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        out |= {dotted, f.name}
        if dataclasses.is_dataclass(hints[f.name]):
            out |= schema_keys(hints[f.name], dotted + ".")
    return out


def input_keys(data, prefix: str = "") -> set[str]:
    """Every key of a (nested) input mapping, dotted and plain, as text."""
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            dotted = f"{prefix}{k}"
            out |= {dotted, str(k)} | input_keys(v, dotted + ".")
    elif isinstance(data, list):
        for v in data:
            out |= input_keys(v, prefix)
    return out


EXPERIMENT_KEYS = schema_keys(Experiment)
STUDY_KEYS = {
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
    "points_to_evaluate",
    "name",
}


def check(error: ConfigError, where: str, data, extra_keys: set[str]) -> None:
    """The message names the source (or the override) and a key, unless the input had none."""
    msg = str(error)
    assert where in msg or "override" in msg, msg
    if isinstance(data, dict) and data:
        keys = {k for k in input_keys(data) | extra_keys if k}
        named = any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", msg) for k in keys)
        assert named, f"names no key: {msg}"
    elif not isinstance(data, dict):
        assert "mapping" in msg, msg


# --------------------------------------------------------------------------- #
# random values and mutations
# --------------------------------------------------------------------------- #

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "adam", "anderson", "implicit", "markov", "1e-3", "-1", "null"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3)
    ),
    max_leaves=6,
)
key_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=16)


def paths(data, prefix=()) -> list[tuple]:
    """Every path to a value in a nested mapping (lists included by index)."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append((*prefix, k))
            out += paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append((*prefix, i))
            out += paths(v, (*prefix, i))
    return out


def mutate(draw, data):
    """A copy of `data` with 1-3 random edits."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        where = paths(data)
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        op = draw(st.sampled_from(["set", "set", "delete", "rename", "add"]))
        if op == "set":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "rename" and isinstance(parent, dict):  # a typo of a real key
            parent[str(last) + draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(last)
        elif op == "add" and isinstance(parent[last], dict):
            parent[last][draw(key_text)] = draw(values)
    return data


def raw(path: Path):
    return yaml.safe_load(path.read_text())


CONFIGS = {name: raw(CONFIG_DIR / f"{name}.yaml") for name in shipped_configs()}
STUDIES = {p: raw(p) for p in sorted(SEARCH_SPACES_DIR.glob("*.yaml"))}


# --------------------------------------------------------------------------- #
# experiments
# --------------------------------------------------------------------------- #


def from_dict(data, where="fuzz.yaml", overrides=None):
    try:
        Experiment.from_dict(data, where, overrides)
    except ConfigError as e:
        check(e, where, data, EXPERIMENT_KEYS | set(overrides or {}))


@settings(max_examples=500, **SETTINGS)
@given(st.data())
def test_mutated_shipped_configs(data):
    name = data.draw(st.sampled_from(sorted(CONFIGS)))
    from_dict(mutate(data.draw, CONFIGS[name]))


@settings(max_examples=200, **SETTINGS)
@given(
    st.dictionaries(
        st.sampled_from(sorted(f.name for f in dataclasses.fields(Experiment))) | key_text,
        values,
        max_size=4,
    )
    | values
)
def test_random_mappings_and_values(data):
    from_dict(data)


override_items = st.lists(
    st.one_of(
        st.text(max_size=24),
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(sorted(EXPERIMENT_KEYS)) | key_text,
            st.text(max_size=10) | st.sampled_from(["1e-3", "[1, 2]", "{a: 1}", "null", ": x"]),
        ),
    ),
    max_size=3,
)


@settings(max_examples=400, **SETTINGS)
@given(override_items)
def test_overrides_parsed_and_applied(items):
    try:
        overrides = parse_overrides(items)
    except ConfigError as e:
        assert "override" in str(e) and "section.key=value" in str(e), str(e)
        return
    from_dict(CONFIGS["markov-tiny"], overrides=overrides)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


yaml_text = st.one_of(
    st.text(max_size=80),
    st.builds(yaml.safe_dump, st.dictionaries(key_text, values, max_size=4)),
    st.builds(
        lambda base, junk: base + junk,
        st.sampled_from([(CONFIG_DIR / f"{n}.yaml").read_text() for n in sorted(CONFIGS)]),
        st.sampled_from(["\n  bad: [", "\noptim: 3\n", "\n\t\n", "\n? [a, b]\n: c\n", "\n*x\n"]),
    ),
)


@settings(max_examples=150, **SETTINGS)
@given(yaml_text, st.lists(st.text(max_size=16), max_size=2))
def test_load_config_from_random_files(scratch, text, overrides):
    path = scratch / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, overrides)
    except ConfigError as e:
        assert str(path) in str(e) or "override" in str(e), str(e)


# --------------------------------------------------------------------------- #
# studies
# --------------------------------------------------------------------------- #


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_mutated_shipped_studies(data):
    path = data.draw(st.sampled_from(sorted(STUDIES)))
    study = mutate(data.draw, STUDIES[path])
    try:
        Study.from_dict(study, str(path))
    except ConfigError as e:
        check(e, str(path), study, STUDY_KEYS | EXPERIMENT_KEYS)


@settings(max_examples=100, **SETTINGS)
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(yaml.safe_dump, st.dictionaries(st.sampled_from(sorted(STUDY_KEYS)), values)),
    ),
    override_items,
)
def test_load_study_from_random_files(scratch, text, overrides):
    path = scratch / "study.yaml"
    path.write_text(text)
    try:
        load_study(path, overrides)
    except ConfigError as e:
        assert str(path) in str(e) or "override" in str(e), str(e)
