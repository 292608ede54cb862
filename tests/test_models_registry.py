"""Model presets by name: lookup errors, overrides, parameter counts without allocation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from deqray.models import build, count_parameters, describe, make_config, presets

EXPECTED = {
    "deq-transformer-wt103",
    "deq-transformer-wt103-small",
    "deq-transformer-tiny",
    "mdeq-cifar-tiny",
    "mdeq-cifar-large",
    "mdeq-imagenet-small",
    "mdeq-imagenet-large",
    "mdeq-imagenet-xl",
    "mdeq-cityscapes-small",
    "mdeq-cityscapes-large",
    "mdeq-cityscapes-xl",
}


def test_every_preset_of_the_issue_is_registered():
    assert EXPECTED <= set(presets())


def test_unknown_preset_and_key_name_the_nearest():
    with pytest.raises(
        ValueError, match=r"unknown model preset 'mdeq-cifar-tin' .*'mdeq-cifar-tiny'"
    ):
        build("mdeq-cifar-tin")
    cfg = make_config("mdeq-cifar-tiny")
    field = next(iter(vars(cfg)))
    with pytest.raises(ValueError, match=rf"did you mean {field!r}"):
        make_config("mdeq-cifar-tiny", **{field + "x": 1})
    with pytest.raises(ValueError, match="'preset' or a 'family'"):
        make_config({"width": 3})
    with pytest.raises(ValueError, match="unknown model family"):
        make_config({"family": "mdeqq"})


def test_mapping_with_overrides_reaches_the_model():
    base = make_config("mdeq-cifar-tiny")
    field, value = next((k, v) for k, v in vars(base).items() if isinstance(v, int) and v > 1)
    cfg = make_config({"preset": "mdeq-cifar-tiny", field: value + 1})
    assert getattr(cfg, field) == value + 1
    assert getattr(make_config("mdeq-cifar-tiny"), field) == value  # presets are not mutated


def test_parameter_counts_on_meta_device_match_a_real_build():
    real = build("mdeq-cifar-tiny")
    assert count_parameters("mdeq-cifar-tiny") == sum(p.numel() for p in real.parameters())
    real = build("deq-transformer-tiny")
    assert count_parameters("deq-transformer-tiny") == sum(p.numel() for p in real.parameters())


def test_describe_and_cli_listing():
    rows = {r["preset"]: r for r in describe()}
    assert EXPECTED <= rows.keys()
    # the large presets are counted without allocating them
    assert rows["deq-transformer-wt103"]["parameters"] > rows["deq-transformer-tiny"]["parameters"]
    assert rows["mdeq-imagenet-xl"]["parameters"] > rows["mdeq-imagenet-small"]["parameters"]
    out = subprocess.run(
        [sys.executable, "-m", "deqray.cli", "models"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    for name in EXPECTED:
        assert name in out.stdout
    assert f"{rows['mdeq-cifar-tiny']['parameters']:,}" in out.stdout
    assert torch.get_default_device().type == "cpu"  # the meta device did not leak
