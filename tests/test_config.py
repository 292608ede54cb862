"""deqray.config: shipped recipes, round trips, override parsing, and bad configs.

No Ray is started here: `deqray train --print-config` and config errors
return before the driver touches Ray.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from deqray.cli import main
from deqray.config import (
    CONFIG_DIR,
    ConfigError,
    Experiment,
    load_config,
    parse_overrides,
    shipped_configs,
)

# A minimal valid config for each family; the bad cases below change one thing.
LM = {"model": {"preset": "deq-transformer-tiny"}, "optim": {"steps": 10}}
VISION = {
    "model": {"preset": "mdeq-cifar-tiny"},
    "data": {"source": "digits"},
    "optim": {"steps": 10},
}


def write(tmp_path: Path, data, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def merge(base: dict, changes: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **values}
        else:
            out[section] = values
    return out


# --------------------------------------------------------------------------- #
# shipped configs
# --------------------------------------------------------------------------- #


def test_the_reference_recipes_are_shipped():
    names = set(shipped_configs())
    assert {
        "wt103-deq",
        "wt103-deq-jac",
        "cifar10-mdeq-large-jac",
        "imagenet-mdeq-small",
        "markov-tiny",
        "digits-tiny",
        "cityscapes-mdeq-small",
        "shapes-mdeq-tiny",
    } <= names


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_loads_with_the_task_its_name_implies(name):
    cfg = load_config(name)
    assert Path(cfg.source) == CONFIG_DIR / f"{name}.yaml"
    want = "language_model" if name.startswith(("wt103", "markov")) else "image_classification"
    if name.startswith(("cityscapes", "shapes")):
        want = "segmentation"
    assert name.startswith(
        ("wt103", "markov", "cifar", "imagenet", "digits", "cityscapes", "shapes")
    )
    assert cfg.task == want and cfg.get_task().name == want
    # without the task key, the model's preset implies the same task
    assert Experiment.from_dict({**cfg.to_dict(), "task": None}).get_task().name == want
    # the same file read by path gives the same config
    assert load_config(CONFIG_DIR / f"{name}.yaml") == cfg
    # and it survives the trip to a Ray worker
    assert Experiment.from_dict(cfg.to_dict()) == cfg


def test_wt103_deq_recipe():
    # Bai et al. 2019, DEQ-Sequence/wt103_deq_transformer.sh
    cfg = load_config("wt103-deq")
    m = cfg.model_config()
    d = m.deq_config()
    assert (m.d_model, m.n_head, m.d_head, m.d_inner) == (700, 10, 70, 48000)
    assert m.cutoffs  # adaptive softmax
    assert m.dropout == pytest.approx(0.05)
    assert m.weight_norm is True
    assert (d.f_solver, d.f_thres, d.b_solver, d.b_thres) == ("anderson", 30, "broyden", 35)
    assert d.f_thres_jitter == 0
    assert d.eval_f_thres in (None, 30)  # evaluation at the training f_thres
    assert d.pretrain_layers == 2
    o = cfg.optim
    assert (o.name, o.lr, o.warmup_steps, o.schedule) == ("adam", 2.5e-4, 16000, "cosine")
    assert (o.steps, o.epochs, o.batch_size, o.clip_grad_norm) == (300000, None, 56, 0.25)
    assert cfg.scaling.workers == 4 and o.batch_size // cfg.scaling.workers == 14
    assert cfg.pretrain_steps() == 32000
    assert cfg.train.eval_every == 5000
    assert cfg.reg.jac_loss_weight == 0


def test_wt103_deq_jac_recipe():
    # Bai et al. 2021, DEQ-Sequence/wt103_deq_transformer_reg.sh
    cfg = load_config("wt103-deq-jac")
    m = cfg.model_config()
    d = m.deq_config()
    assert m.mem_len == 300
    assert m.dropout == pytest.approx(0.06)
    assert m.dropatt == pytest.approx(0.01)
    assert (d.f_solver, d.b_solver) == ("anderson", "broyden")
    # training f_thres drawn from {10, 11, 12}; evaluation at 12; backward 13
    assert (d.f_thres, d.f_thres_jitter) == (11, 1)
    assert {d.f_thres + j for j in range(-d.f_thres_jitter, d.f_thres_jitter + 1)} == {10, 11, 12}
    assert d.eval_f_thres == 12
    assert d.b_thres == 13
    r = cfg.reg
    assert r.jac_loss_weight == pytest.approx(1.9)
    assert r.jac_loss_freq == pytest.approx(0.35)
    assert r.jac_incremental == 35000
    # the rest is the unregularised recipe
    o = cfg.optim
    assert (o.name, o.lr, o.warmup_steps, o.steps, o.batch_size) == (
        "adam",
        2.5e-4,
        16000,
        300000,
        56,
    )
    assert o.clip_grad_norm == 0.25
    assert cfg.pretrain_steps() == 32000


def test_wt103_deq_jac_budget_is_drawn_from_10_11_12_and_evaluates_at_12():
    """The DEQ built from the recipe's solver settings really spends those budgets."""
    from deqray.core.deq import DEQ

    d = load_config("wt103-deq-jac").model_config().deq_config()
    d = dataclasses.replace(d, f_tol=1e-30)  # never stop early: nfe is the budget

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))

        def forward(self, z, x):
            return torch.tanh(z @ self.w + x)

    deq = DEQ(F(), d)
    torch.manual_seed(0)
    budgets = collections.Counter()
    with torch.no_grad():
        for _ in range(60):
            _, info = deq(torch.randn(2, 8), torch.zeros(2, 8))
            budgets[int(info.metrics()["fwd_nfe"])] += 1
        deq.eval()
        _, info = deq(torch.randn(2, 8), torch.zeros(2, 8))
    assert set(budgets) == {10, 11, 12}
    assert int(info.metrics()["fwd_nfe"]) == 12


def test_cifar10_mdeq_large_jac_recipe():
    # Bai et al. 2021, MDEQ-Vision/experiments/cifar/cls_mdeq_LARGE_reg.yaml
    cfg = load_config("cifar10-mdeq-large-jac")
    m = cfg.model_config()
    d = m.deq_config()
    assert m.dropout == pytest.approx(0.22)
    assert m.pretrain_layers == 8 and d.pretrain_layers == 8
    assert tuple(m.image_size) == (32, 32)
    assert (d.f_solver, d.f_thres, d.b_solver, d.b_thres) == ("broyden", 8, "broyden", 7)
    assert d.f_stop_mode == "rel"
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.schedule) == ("adam", 1e-3, 0.0, "cosine")
    assert o.min_lr == pytest.approx(1e-6)
    assert (o.epochs, o.steps, o.batch_size, o.clip_grad_norm) == (220, None, 96, None)
    assert cfg.scaling.workers == 1
    assert cfg.pretrain_steps() == 16000
    r = cfg.reg
    assert r.jac_loss_weight == pytest.approx(0.4)
    assert r.jac_loss_freq == pytest.approx(0.02)
    steps_per_epoch = math.ceil(50000 / 96)
    assert steps_per_epoch == 521
    assert r.jac_stop_step == 90 * steps_per_epoch == 46890
    assert cfg.data.augment is True  # crops and flips


def test_imagenet_mdeq_small_recipe():
    # Bai et al. 2020, MDEQ-Vision/experiments/imagenet/cls_mdeq_SMALL.yaml
    cfg = load_config("imagenet-mdeq-small")
    m = cfg.model_config()
    d = m.deq_config()
    assert m.num_classes == 1000
    assert tuple(m.image_size) == (224, 224)
    assert m.dropout == 0.0
    assert m.pretrain_layers == 5 and d.pretrain_layers == 5
    assert (d.f_solver, d.f_thres, d.b_solver, d.b_thres) == ("broyden", 26, "broyden", 27)
    assert d.f_stop_mode == "abs"
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.nesterov) == ("sgd", 0.05, 0.9, True)
    assert o.weight_decay == pytest.approx(5e-5)
    assert o.min_lr == pytest.approx(1e-6)
    assert (o.schedule, o.epochs, o.steps, o.clip_grad_norm) == ("cosine", 100, None, None)
    assert (o.batch_size, cfg.scaling.workers) == (128, 4)
    assert o.batch_size // cfg.scaling.workers == 32
    assert cfg.pretrain_steps() == 510000
    # one epoch of 1,281,167 images in whole per-worker batches of 32 on 4 workers
    assert cfg.train.eval_every == (1281167 // 4) // 32 == 10009


def test_laptop_configs_use_embedded_data_and_one_worker():
    laptop = (("markov-tiny", "markov"), ("digits-tiny", "digits"), ("shapes-mdeq-tiny", "shapes"))
    for name, source in laptop:
        cfg = load_config(name)
        assert cfg.data.source == source
        assert cfg.scaling.workers == 1 and cfg.scaling.gpus_per_worker == 0
        assert cfg.optim.steps is not None and cfg.optim.steps <= 1000
    assert load_config("digits-tiny").model["preset"] == "mdeq-cifar-tiny"


def test_cityscapes_mdeq_small_recipe():
    # Bai et al. 2020, MDEQ-Vision/experiments/cityscapes/seg_mdeq_SMALL.yaml
    cfg = load_config("cityscapes-mdeq-small")
    m = cfg.model_config()
    d = m.deq_config()
    assert (m.task, m.num_classes, m.ignore_index, m.dropout) == ("segmentation", 19, 255, 0.05)
    assert m.downsample_times == 2 and m.channels == [32, 64, 128, 256]
    assert (d.f_solver, d.f_thres, d.b_solver, d.b_thres, d.f_stop_mode) == (
        "broyden",
        27,
        "broyden",
        30,
        "abs",
    )
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.nesterov, o.schedule) == ("sgd", 0.01, 0.9, False, "cosine")
    assert o.weight_decay == pytest.approx(2e-4)
    assert (o.batch_size, cfg.scaling.workers, o.batch_size // cfg.scaling.workers) == (12, 4, 3)
    assert cfg.pretrain_steps() == 60000
    assert o.steps == 124000 == round(500 * 2975 / 12, -3)  # the reference's 500 epochs


# --------------------------------------------------------------------------- #
# round trips and overrides
# --------------------------------------------------------------------------- #


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config("markov-tiny", ["deq.f_thres=12", "optim.clip_grad_norm=null"])
    assert Experiment.from_dict(cfg.to_dict()) == cfg
    again = Experiment.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    d = cfg.to_dict()
    d["optim"]["lr"] = 0.5
    assert cfg.optim.lr == 0.002  # to_dict is a copy


def test_with_overrides_dict_and_list():
    cfg = load_config("markov-tiny")
    a = cfg.with_overrides({"optim.lr": 0.01, "deq.f_thres": 12, "model.d_model": 48})
    b = cfg.with_overrides(["optim.lr=0.01", "deq.f_thres=12", "model.d_model=48"])
    assert a == b
    assert a.optim.lr == 0.01 and a.deq["f_thres"] == 12 and a.model["d_model"] == 48
    assert a.model_config().d_model == 48
    assert a.model_config().deq_config().f_thres == 12
    # the other deq settings of the file are kept
    assert a.deq["b_thres"] == 25 and a.model_config().deq_config().eval_f_thres == 24
    # the original is untouched
    assert cfg.optim.lr == 0.002 and cfg.deq["f_thres"] == 20 and "d_model" not in cfg.model
    # a model of another task does not fit the language model's task
    with pytest.raises(ConfigError, match="task 'language_model' trains deq_transformer"):
        cfg.with_overrides(["model.preset=mdeq-cifar-tiny"])
    # nor do its data keys fit another task's data section
    with pytest.raises(ConfigError, match=r"data.tgt_len.*\(task image_classification\)"):
        cfg.with_overrides(["task=image_classification", "model.preset=mdeq-cifar-tiny"])


def test_load_config_overrides_match_with_overrides():
    a = load_config("digits-tiny", ["optim.batch_size=64", "scaling.workers=2"])
    b = load_config("digits-tiny").with_overrides({"optim.batch_size": 64, "scaling.workers": 2})
    assert a == b
    assert (a.optim.batch_size, a.scaling.workers) == (64, 2)


def test_override_values_are_read_as_yaml():
    got = parse_overrides(
        [
            "optim.lr=0.001",
            "deq.f_solver=broyden",
            "train.eval_sradius=true",
            "optim.clip_grad_norm=null",
            "optim.betas=[0.8, 0.99]",
            "deq.f_thres=24",
            "checkpoint.name=run-1",
        ]
    )
    assert got == {
        "optim.lr": 0.001,
        "deq.f_solver": "broyden",
        "train.eval_sradius": True,
        "optim.clip_grad_norm": None,
        "optim.betas": [0.8, 0.99],
        "deq.f_thres": 24,
        "checkpoint.name": "run-1",
    }
    assert type(got["deq.f_thres"]) is int


def test_overrides_are_typed_in_the_config():
    cfg = load_config(
        "markov-tiny",
        [
            "optim.lr=0.001",
            "deq.f_solver=broyden",
            "train.eval_sradius=true",
            "optim.clip_grad_norm=null",
        ],
    )
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 0.001
    assert cfg.deq["f_solver"] == "broyden"
    assert cfg.model_config().deq_config().f_solver == "broyden"
    assert cfg.train.eval_sradius is True
    assert cfg.optim.clip_grad_norm is None


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1e-03"])
def test_exponent_without_a_dot_is_a_float(tmp_path, text):
    """`optim.lr=1e-3` (the module's own example) and `lr: 1e-3` in a file are 0.001.

    PyYAML resolves YAML 1.1 floats, which need a dot ("1.0e-3"), so a plain
    yaml.safe_load reads "1e-3" as a string and the float field rejects it.
    """
    assert parse_overrides([f"optim.lr={text}"]) == {"optim.lr": 0.001}
    assert load_config("markov-tiny", [f"optim.lr={text}"]).optim.lr == 0.001
    path = write(
        tmp_path, f"model: {{preset: deq-transformer-tiny}}\noptim: {{steps: 5, lr: {text}}}\n"
    )
    assert load_config(path).optim.lr == 0.001


def test_int_is_accepted_for_a_float_field():
    cfg = Experiment.from_dict(merge(LM, {"optim": {"lr": 1, "min_lr": 0}}))
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0
    assert type(cfg.optim.min_lr) is float
    assert (
        type(load_config("markov-tiny", ["scaling.gpus_per_worker=1"]).scaling.gpus_per_worker)
        is float
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.steps", True),  # bool is no int
        ("optim.warmup_steps", False),
        ("optim.steps", 10.5),  # nor is a float
        ("train.eval_every", 100.0),
        ("optim.lr", True),  # bool is no float either
        ("train.eval_sradius", 1),  # int is no bool
        ("optim.betas", [0.9, "x"]),
    ],
)
def test_wrong_scalar_types_are_rejected(key, value):
    with pytest.raises(ConfigError) as e:
        Experiment.from_dict(LM, "exp.yaml", {key: value})
    assert key in str(e.value)
    assert "override" in str(e.value)


def test_unknown_override_syntax():
    with pytest.raises(ConfigError, match="noequals"):
        parse_overrides(["noequals"])
    with pytest.raises(ConfigError, match="optim.lr is not a section"):
        load_config("markov-tiny", ["optim.lr.x=1"])


# --------------------------------------------------------------------------- #
# bad configs: file, dotted key and suggestion in the message
# --------------------------------------------------------------------------- #

BAD_FILES = {
    "unknown-section": (merge(LM, {"optm": {"lr": 0.1}}), ["optm", "'optim'"]),
    "unknown-key": (merge(LM, {"optim": {"lrr": 0.1}}), ["optim.lrr", "'lr'"]),
    "unknown-model-field": (
        merge(LM, {"model": {"d_modl": 64}}),
        ["model", "d_modl", "'d_model'"],
    ),
    "unknown-model-field-vision": (
        merge(VISION, {"model": {"num_grups": 4}}),
        ["model", "num_grups", "'num_groups'"],
    ),
    "unknown-preset": (
        merge(LM, {"model": {"preset": "deq-transformr-tiny"}}),
        ["deq-transformr-tiny", "'deq-transformer-tiny'"],
    ),
    "unknown-deq-key": (merge(LM, {"deq": {"f_thress": 12}}), ["deq", "f_thress", "'f_thres'"]),
    "unknown-deq-key-vision": (
        merge(VISION, {"deq": {"b_thress": 12}}),
        ["deq", "b_thress", "'b_thres'"],
    ),
    "unknown-solver": (
        merge(LM, {"deq": {"f_solver": "andersn"}}),
        ["f_solver", "andersn", "'anderson'"],
    ),
    "wrong-type": (merge(LM, {"optim": {"lr": "fast"}}), ["optim.lr", "fast", "float"]),
    "wrong-section-type": (merge(LM, {"optim": 3}), ["optim", "mapping"]),
    "literal-mismatch": (merge(LM, {"optim": {"name": "adma"}}), ["optim.name", "adma", "'adam'"]),
    "literal-schedule": (
        merge(LM, {"optim": {"schedule": "cosin"}}),
        ["optim.schedule", "'cosine'"],
    ),
    "batch-not-multiple-of-workers": (
        merge(LM, {"optim": {"batch_size": 16}, "scaling": {"workers": 3}}),
        ["optim.batch_size", "scaling.workers=3"],
    ),
    "eval-batch-not-multiple": (
        merge(LM, {"optim": {"eval_batch_size": 5}, "scaling": {"workers": 2}}),
        ["optim.eval_batch_size"],
    ),
    "jac-freq-above-1": (merge(LM, {"reg": {"jac_loss_freq": 1.5}}), ["reg.jac_loss_freq", "1.5"]),
    "steps-and-epochs": (merge(LM, {"optim": {"epochs": 2}}), ["optim.steps", "optim.epochs"]),
    "neither-steps-nor-epochs": (
        {"model": {"preset": "deq-transformer-tiny"}},
        ["optim.steps", "optim.epochs"],
    ),
    "negative-lr": (merge(LM, {"optim": {"lr": -0.1}}), ["optim.lr", "-0.1"]),
    "zero-workers": (merge(LM, {"scaling": {"workers": 0}}), ["scaling.workers"]),
    "name-with-slash": (merge(LM, {"checkpoint": {"name": "a/b"}}), ["checkpoint.name", "a/b"]),
    "name-dotdot": (merge(LM, {"checkpoint": {"name": ".."}}), ["checkpoint.name"]),
    "digits-for-a-transformer": (
        merge(LM, {"data": {"source": "digits"}}),
        ["data.source", "digits", "'markov'"],
    ),
    "markov-for-an-mdeq": (
        merge(VISION, {"data": {"source": "markov"}}),
        ["data.source", "markov", "'digits'"],
    ),
    "invalid-yaml": ("optim: {lr: [1, 2\n", ["not valid YAML"]),
    "top-level-list": ("- optim\n- model\n", ["mapping", "list"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file(tmp_path, case):
    data, wanted = BAD_FILES[case]
    path = write(tmp_path, data, f"{case}.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message
    for text in wanted:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize(
    "data, wanted",
    [
        (merge(LM, {"optim": {"min_lr": -1e-4}}), ["optim.min_lr"]),
    ],
    ids=["negative-min-lr"],
)
def test_bad_bounds_that_validation_misses(tmp_path, data, wanted):
    """A negative cosine floor gives negative learning rates (gradient ascent) at the end."""
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    for text in wanted:
        assert text in str(e.value)


BAD_OVERRIDES = {
    "optm.lr=0.1": ["optm", "'optim'"],
    "optim.lrr=0.1": ["optim.lrr", "'lr'"],
    "model.d_modl=64": ["d_modl", "'d_model'"],
    "model.preset=deq-transformr-tiny": ["deq-transformr-tiny", "'deq-transformer-tiny'"],
    "deq.f_thress=12": ["f_thress", "'f_thres'"],
    "deq.f_solver=brodyen": ["f_solver", "'broyden'"],
    "optim.lr=fast": ["optim.lr", "fast"],
    "optim.name=adma": ["optim.name", "'adam'"],
    "optim.batch_size=15": ["optim.batch_size"],
    "reg.jac_loss_freq=1.5": ["reg.jac_loss_freq"],
    "checkpoint.name=a/b": ["checkpoint.name"],
    "data.source=digits": ["data.source", "'markov'"],
}


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_bad_override_names_the_override(override):
    # the batch case on 2 workers: 15 rows cannot be split between them
    extra = ["scaling.workers=2"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as e:
        load_config("markov-tiny", [*extra, override])
    message = str(e.value)
    key = override.partition("=")[0]
    assert f"override {key}=" in message, message
    for text in BAD_OVERRIDES[override]:
        assert text in message, f"{text!r} not in {message!r}"


def test_steps_and_epochs_from_an_override():
    # markov-tiny gives optim.steps; adding epochs by override is ambiguous
    with pytest.raises(ConfigError, match="give exactly one of optim.steps and optim.epochs"):
        load_config("markov-tiny", ["optim.epochs=3"])
    cfg = load_config("markov-tiny", ["optim.epochs=3", "optim.steps=null"])
    assert (cfg.optim.steps, cfg.optim.epochs) == (None, 3.0)


@pytest.mark.parametrize(
    "name, hint",
    [("markov-tny", "'markov-tiny'"), ("wt103-deq-jak", "'wt103-deq-jac'"), ("nothing.yaml", None)],
)
def test_missing_config_file(name, hint):
    with pytest.raises(ConfigError) as e:
        load_config(name)
    message = str(e.value)
    assert name in message and "no such config file" in message
    if hint:
        assert hint in message
    for shipped in shipped_configs():
        assert shipped in message


def test_missing_path_in_an_existing_directory(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(path)


# --------------------------------------------------------------------------- #
# deqray train --print-config
# --------------------------------------------------------------------------- #


def test_print_config_reflects_overrides_and_options(tmp_path, capsys):
    path = write(tmp_path, merge(LM, {"optim": {"batch_size": 8}}))
    rc = main(
        [
            "train",
            str(path),
            "optim.lr=0.01",
            "deq.f_thres=7",
            "--workers",
            "2",
            "--gpus-per-worker",
            "0.5",
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "my-run",
            "--print-config",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == 0.01
    assert printed["deq"]["f_thres"] == 7
    assert printed["scaling"]["workers"] == 2
    assert printed["scaling"]["gpus_per_worker"] == 0.5
    assert printed["checkpoint"]["storage"] == str(tmp_path / "runs")
    assert printed["checkpoint"]["name"] == "my-run"
    # the printed config is the resolved one, complete and loadable again
    cfg = Experiment.from_dict(printed)
    assert cfg == load_config(path).with_overrides(
        {
            "optim.lr": 0.01,
            "deq.f_thres": 7,
            "scaling.workers": 2,
            "scaling.gpus_per_worker": 0.5,
            "checkpoint.storage": str(tmp_path / "runs"),
            "checkpoint.name": "my-run",
        }
    )


def test_print_config_of_a_shipped_config(capsys):
    assert main(["train", "digits-tiny", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert Experiment.from_dict(printed) == load_config("digits-tiny")


@pytest.mark.parametrize(
    "args, wanted",
    [
        (["optim.lrr=0.1"], ["optim.lrr", "'lr'"]),
        (["deq.f_thress=3"], ["f_thress", "'f_thres'"]),
        (["--workers", "3"], ["optim.batch_size", "scaling.workers=3"]),
        (["--name", "a/b"], ["checkpoint.name"]),
    ],
)
def test_train_with_a_bad_config_exits_2(args, wanted, capsys):
    rc = main(["train", "markov-tiny", *args, "--print-config"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err.startswith("deqray train: ")
    for text in wanted:
        assert text in captured.err


def test_train_with_a_missing_config_exits_2(capsys):
    assert main(["train", "markov-tny", "--print-config"]) == 2
    assert "'markov-tiny'" in capsys.readouterr().err
