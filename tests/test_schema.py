"""`deqray schema experiment|study`: the JSON Schema that editors check YAML files with.

Checked with the `jsonschema` package, independently of pydantic: every
shipped config and study file validates against it, and the broken files of
tests/test_config.py and tests/test_tune_study.py that a schema can see
(an unknown key, a wrong type, a value out of bounds) do not, while deqray's
own loader rejects the same files with its message. No Ray; about 2 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from deqray.cli import main
from deqray.config import (
    CONFIG_DIR,
    ConfigError,
    _yaml,
    experiment_schema,
    load_config,
    shipped_configs,
)
from deqray.tune.study import SEARCH_SPACES_DIR, load_study
from deqray.tune.study_schema import study_schema
from tests.test_config import BAD_FILES, LM, merge
from tests.test_tune_study import INVALID, VALID

ROOT = Path(__file__).resolve().parents[1]
STUDY_FILES = [*sorted(SEARCH_SPACES_DIR.glob("*.yaml")), ROOT / "examples/deblur/study.yaml"]

# the broken files of test_config.py whose fault is a single key's type, name or bounds
SCHEMA_VISIBLE_CONFIGS = [
    "unknown-section",
    "unknown-key",
    "wrong-type",
    "wrong-section-type",
    "literal-mismatch",
    "literal-schedule",
    "jac-freq-above-1",
    "negative-lr",
    "zero-workers",
    "top-level-list",
]
MORE_BAD_CONFIGS = {  # out of bounds, and inside lists and sections of sections
    "negative-min-lr": merge(LM, {"optim": {"min_lr": -1e-4}}),
    "beta-of-1": merge(LM, {"optim": {"betas": [0.9, 1.0]}}),
    "three-betas": merge(LM, {"optim": {"betas": [0.9, 0.99, 0.999]}}),
    "bool-for-an-int": merge(LM, {"train": {"eval_every": True}}),
    "keep-0": merge(LM, {"checkpoint": {"keep": 0}}),
    "unknown-data-key": merge(LM, {"data": {"tgt_lenn": 16}}),
    "unknown-tracking-key": merge(LM, {"tracking": {"mlflow": {"urii": "http://x"}}}),
}
SCHEMA_VISIBLE_STUDIES = [
    "unknown top-level key",
    "base missing",
    "bad direction",
    "no objectives",
    "unknown distribution type",
    "unknown distribution option",
    "empty choices",
    "non-scalar choice",
    "unknown sampler",
    "asha grace_period < 1",
    "asha reduction_factor < 2",
    "unknown asha option",
    "trials < 1",
    "concurrency < 1",
    "unknown resource",
    "bad resource value",
    "bad seed",
]


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)  # a well-formed schema
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def experiment():
    return validator(experiment_schema())


@pytest.fixture(scope="module")
def study():
    return validator(study_schema())


def problems(v: jsonschema.Draft202012Validator, data) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(data)]


# --------------------------------------------------------------------------- #
# shipped files validate
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_validates_against_the_schema(experiment, name):
    data = _yaml((CONFIG_DIR / f"{name}.yaml").read_text())
    assert problems(experiment, data) == []
    # and the config as it travels (every key spelled out) too
    assert problems(experiment, load_config(name).to_dict()) == []


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_shipped_study_validates_against_the_schema(study, path):
    assert problems(study, _yaml(path.read_text())) == []
    assert problems(study, load_study(path).to_dict()) == []


# --------------------------------------------------------------------------- #
# broken files do not, and the loader says the same
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", SCHEMA_VISIBLE_CONFIGS + sorted(MORE_BAD_CONFIGS))
def test_broken_config_fails_the_schema_and_the_loader(experiment, tmp_path, case):
    data = BAD_FILES[case][0] if case in BAD_FILES else MORE_BAD_CONFIGS[case]
    if isinstance(data, str):
        data = yaml.safe_load(data)
    assert problems(experiment, data), f"the schema accepts {case}: {data}"
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


@pytest.mark.parametrize("case", SCHEMA_VISIBLE_STUDIES)
def test_broken_study_fails_the_schema_and_the_loader(study, tmp_path, case):
    (data,) = [c[1] for c in INVALID if c[0] == case]
    assert problems(study, data), f"the schema accepts {case}: {data}"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=str(path)):
        load_study(path)


def test_the_study_shorthands_are_in_the_schema(study):
    short = {**VALID, "sampler": "random", "scheduler": "none"}
    short["space"] = {**VALID["space"], "deq.grad": ["implicit", "phantom"]}
    assert problems(study, short) == []
    assert problems(study, {**short, "sampler": "randm"})


@pytest.mark.parametrize(
    "override, wanted",
    [
        ("optim.lr=fast", "optim.lr: expected float > 0, got 'fast'"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be < 1, got 1"),
        ("checkpoint.keep=0", "checkpoint.keep: must be >= 1, got 0"),
        ("optim.steps=null", "optim.steps: give exactly one of optim.steps and optim.epochs"),
        ("train.amp=bf61", "train.amp: expected 'auto' | 'bf16' | 'off', got 'bf61' (did you "),
        ("data.tgt_lenn=3", "unknown key 'data.tgt_lenn' (did you mean 'tgt_len'?); valid keys"),
        ("optim=3", "optim: expected a section (mapping), got 3"),
        ("tracking.mlflow.urii=x", "unknown key 'tracking.mlflow.urii' (did you mean 'uri'?)"),
    ],
)
def test_the_loader_names_the_override_the_key_and_what_it_expected(override, wanted):
    with pytest.raises(ConfigError) as e:
        load_config("markov-tiny", [override])
    key, _, value = override.partition("=")
    assert str(e.value).startswith(f"override {key}=")
    assert wanted in str(e.value)


# --------------------------------------------------------------------------- #
# what an editor shows, and the command
# --------------------------------------------------------------------------- #


def test_the_schema_carries_bounds_defaults_and_docs():
    schema = experiment_schema()
    optim = schema["$defs"]["Optim"]["properties"]
    assert optim["lr"]["exclusiveMinimum"] == 0 and optim["lr"]["default"] == 1e-3
    assert "learning rate" in optim["lr"]["description"]
    assert optim["name"]["enum"] == ["adam", "adamw", "sgd"]
    assert optim["betas"]["minItems"] == optim["betas"]["maxItems"] == 2
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Optim"]["additionalProperties"] is False
    # the data section is any shipped task's
    data_refs = {s["$ref"].rsplit("/", 1)[1] for s in schema["properties"]["data"]["anyOf"]}
    assert data_refs == {"LMData", "ImageData", "SegmentationData"}
    space = study_schema()["$defs"]["ParamSpec"]["properties"]
    assert space["type"]["enum"] == ["int", "float", "categorical"]


def test_deqray_schema_prints_and_writes_it(tmp_path, capsys):
    assert main(["schema", "experiment"]) == 0
    assert json.loads(capsys.readouterr().out) == experiment_schema()
    out = tmp_path / "study.schema.json"
    assert main(["schema", "study", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == study_schema()
    assert capsys.readouterr().out == ""
