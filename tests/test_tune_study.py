"""Study files: loading, validation errors, sampling, samplers and the Pareto front (no Ray)."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
from pathlib import Path

import optuna
import pytest
import yaml

from deqray.config import ConfigError
from deqray.tune.study import (
    Param,
    Study,
    load_study,
    pareto_front,
    shipped_studies,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

# a small valid study; each invalid case below changes one entry of it
VALID = {
    "base": "markov-tiny",
    "overrides": {"optim.steps": 80},
    "objectives": {"val_ppl": "min"},
    "space": {
        "optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "deq.f_thres": {"type": "int", "low": 4, "high": 30, "step": 2},
        "deq.grad": {"type": "categorical", "choices": ["implicit", "phantom"]},
        "deq.b_thres": {"type": "int", "low": 4, "high": 40, "when": {"deq.grad": "implicit"}},
        "reg.jac_loss_weight": {"type": "float", "low": 0.0, "high": 2.0},
    },
    "sampler": {"name": "tpe", "seed": 0},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "trials": 8,
    "concurrency": 2,
    "resources": {"workers": 1, "gpus_per_worker": 0},
    "seed": 0,
    "points_to_evaluate": [
        {
            "optim.lr": 0.002,
            "deq.f_thres": 20,
            "deq.grad": "implicit",
            "deq.b_thres": 25,
            "reg.jac_loss_weight": 0.0,
        }
    ],
}


def write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def changed(**entries) -> dict:
    """VALID with top-level entries replaced (None removes one); space.X keys edit the space."""
    data = yaml.safe_load(yaml.safe_dump(VALID, sort_keys=False))
    for key, value in entries.items():
        if key.startswith("space__"):
            name = key[len("space__") :].replace("__", ".")
            if value is None:
                data["space"].pop(name)
            else:
                data["space"][name] = value
        elif value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


# --------------------------------------------------------------------------- #
# shipped studies
# --------------------------------------------------------------------------- #


def test_shipped_studies_load():
    names = shipped_studies()
    assert {"quickstart", "deq_wt103", "mdeq_cifar", "mdeq_imagenet", "mdeq_cityscapes"} <= set(
        names
    )
    for name in names:
        study = load_study(SPACES / f"{name}.yaml")
        assert study.name == name
        assert study.space and study.objectives and study.trials >= 1
        for point in study.reference_points():  # each reference point makes a valid trial
            study.experiment(point)
        assert len(study.space_summary()) == len(study.space)
        study.make_sampler()


def test_quickstart_content():
    s = load_study(SPACES / "quickstart.yaml")
    assert s.base == "markov-tiny" and s.fixed.data.source == "markov"
    assert s.is_multi_objective and s.metric_names() == ["val_ppl", "val_fwd_nstep"]
    assert s.directions() == ["minimize", "minimize"]
    assert s.concurrency == 2 and s.fixed.scaling.workers == 1
    assert s.fixed.scaling.gpus_per_worker == 0
    assert s.scheduler.name == "asha" and s.scheduler.max_t == s.reports_per_trial() == 8
    # the hand-set reference (markov-tiny's own values) is the first trial
    ref = s.reference_points()[0]
    cfg = s.experiment(ref)
    assert cfg.optim.lr == 0.002 and cfg.deq["f_thres"] == 20 and cfg.reg.jac_loss_weight == 0
    assert cfg.deq["eval_f_thres"] is None  # evaluation at the sampled budget


def test_cluster_studies_use_gpus_and_leave_data_alone():
    for name, workers in (
        ("deq_wt103", 4),
        ("mdeq_cifar", 1),
        ("mdeq_imagenet", 4),
        ("mdeq_cityscapes", 4),
    ):
        s = load_study(SPACES / f"{name}.yaml")
        assert s.fixed.scaling.workers == workers and s.fixed.scaling.gpus_per_worker == 1
        assert s.concurrency * workers <= 8  # an 8-GPU cluster
        assert s.fixed.data.source.startswith("s3://")
    assert load_study(SPACES / "mdeq_cifar.yaml").reports_per_trial() is None  # epochs
    assert load_study(SPACES / "mdeq_cifar.yaml").reports_per_trial(steps_per_epoch=520) == 220


def test_load_overrides_and_round_trip(tmp_path):
    path = write(tmp_path, VALID)
    s = load_study(path, ["trials=3", "sampler.name=random", "optim.steps=40", "name=x"])
    assert s.trials == 3 and s.sampler.name == "random" and s.name == "x"
    assert s.fixed.optim.steps == 40 and s.overrides["optim.steps"] == 40
    assert load_study(path).name == "study"  # default: the file stem
    with pytest.raises(ConfigError, match="trialz"):
        load_study(path, {"trialz": 3})
    again = Study.from_dict(s.to_dict(), "saved")  # the base travels inline
    assert again.to_dict() == s.to_dict()
    assert pickle.loads(pickle.dumps(s)).to_dict() == s.to_dict()  # OptunaSearch pickles it
    json.dumps(s.to_dict())  # the runner saves it as study.json
    seeded = load_study(write(tmp_path, changed(seed=None, overrides={"train.seed": 4})))
    assert seeded.seed == 4 and Study.from_dict(seeded.to_dict()).experiment().train.seed == 4


def test_base_path_is_relative_to_the_study_file(tmp_path):
    from deqray.config import find_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text(find_config("markov-tiny").read_text())
    s = load_study(write(tmp_path, changed(base="sub/mine.yaml")))
    assert s.base.endswith("mine.yaml") and s.fixed.optim.steps == 80


# --------------------------------------------------------------------------- #
# invalid studies: each names the file and the entry
# --------------------------------------------------------------------------- #

F = {"type": "float", "low": 0.0, "high": 1.0}
INVALID = [
    # (case id, study, text in the message besides the file name)
    ("unknown top-level key", changed(trails=3), ["trails", "did you mean 'trials'"]),
    ("base missing", changed(base=None), ["base"]),
    ("base not found", changed(base="markov-tine"), ["base", "markov-tine", "markov-tiny"]),
    ("base invalid", changed(base={"optim": {"stepz": 3}}), ["base", "optim.stepz"]),
    ("bad override", changed(overrides={"optim.stepz": 3}), ["overrides", "optim.stepz"]),
    ("bad override value", changed(overrides={"optim.steps": 0}), ["overrides", "optim.steps"]),
    (
        "unknown objective",
        changed(objectives={"val_pplx": "min"}),
        ["objectives.val_pplx", "did you mean 'val_ppl'"],
    ),
    (
        "objective of another task",
        changed(objectives={"val_acc": "max"}),
        ["objectives.val_acc", "task 'language_model' reports val_ppl, val_loss, val_tokens"],
    ),
    ("bad direction", changed(objectives={"val_ppl": "down"}), ["objectives.val_ppl", "min"]),
    ("no objectives", changed(objectives={}), ["objectives"]),
    (
        "sradius without eval_sradius",
        changed(objectives={"val_sradius": "min"}),
        ["objectives.val_sradius", "eval_sradius"],
    ),
    (
        "unknown space key",
        changed(
            space__deq__f_thres=None, space__deq__f_thress={"type": "int", "low": 4, "high": 8}
        ),
        ["space.deq.f_thress", "unknown key 'deq.f_thress'", "did you mean 'f_thres'"],
    ),
    (
        "unknown section",
        changed(space__optm__lr=F),
        ["space.optm.lr", "did you mean 'optim'"],
    ),
    ("undotted key", changed(space__lr=F), ["space.lr", "dotted"]),
    (
        "unknown model key",
        changed(space__model__d_modl={"type": "int", "low": 16, "high": 64}),
        ["space.model.d_modl", "did you mean 'd_model'"],
    ),
    (
        "float on an int field",
        changed(space__deq__f_thres={"type": "float", "low": 4.0, "high": 30.0}),
        ["space.deq.f_thres", "int setting"],
    ),
    (
        "int on a str field",
        changed(space__deq__f_solver={"type": "int", "low": 1, "high": 3}),
        ["space.deq.f_solver", "categorical"],
    ),
    (
        "int on a literal field",
        changed(space__optim__name={"type": "int", "low": 1, "high": 3}),
        ["space.optim.name", "categorical"],
    ),
    (
        "range on a bool field",
        changed(space__optim__nesterov={"type": "int", "low": 0, "high": 1}),
        ["space.optim.nesterov", "bool", "[true, false]"],
    ),
    (
        "bad choice on a bool field",
        changed(space__logging__histograms={"type": "categorical", "choices": [0, 1]}),
        ["space.logging.histograms", "choice 0"],
    ),
    (
        "bad choice",
        changed(space__deq__grad={"type": "categorical", "choices": ["implicit", "explicit"]}),
        ["space.deq.grad", "explicit"],
    ),
    (
        "unknown solver choice",
        changed(space__deq__f_solver={"type": "categorical", "choices": ["anderson", "broydn"]}),
        ["space.deq.f_solver", "broydn"],
    ),
    (
        "bound outside the field's range",
        changed(space__deq__f_thres={"type": "int", "low": 0, "high": 30}),
        ["space.deq.f_thres", "low 0", ">= 1"],
    ),
    (
        "inner value outside the field's range (model)",
        changed(space__model__d_model={"type": "int", "low": 16, "high": 64, "step": 3}),
        ["space.model.d_model", "value 19", "even"],
    ),
    (
        "odd d_model",
        changed(space__model__d_model={"type": "categorical", "choices": [32, 33]}),
        ["space.model.d_model", "choice 33", "even"],
    ),
    (
        "low >= high",
        changed(space__optim__lr={"type": "float", "low": 0.01, "high": 0.001}),
        ["space.optim.lr", "low must be < high"],
    ),
    (
        "log with low <= 0",
        changed(
            space__reg__jac_loss_weight={"type": "float", "low": 0.0, "high": 1.0, "log": True}
        ),
        ["space.reg.jac_loss_weight", "low > 0"],
    ),
    (
        "int step not dividing",
        changed(space__deq__f_thres={"type": "int", "low": 4, "high": 31, "step": 2}),
        ["space.deq.f_thres", "does not divide"],
    ),
    (
        "float step not dividing",
        changed(space__reg__jac_loss_weight={"type": "float", "low": 0, "high": 1, "step": 0.3}),
        ["space.reg.jac_loss_weight", "does not divide"],
    ),
    (
        "log with step",
        changed(
            space__optim__lr={"type": "float", "low": 1e-3, "high": 1e-2, "log": True, "step": 1e-3}
        ),
        ["space.optim.lr", "log and step"],
    ),
    (
        "int range with float bounds",
        changed(space__deq__f_thres={"type": "int", "low": 4.5, "high": 30}),
        ["space.deq.f_thres", "low", "an int"],
    ),
    (
        "missing high",
        changed(space__deq__f_thres={"type": "int", "low": 4}),
        ["space.deq.f_thres", "high"],
    ),
    (
        "unknown distribution type",
        changed(space__deq__f_thres={"type": "integer", "low": 4, "high": 30}),
        ["space.deq.f_thres", "did you mean 'int'"],
    ),
    (
        "unknown distribution option",
        changed(space__deq__f_thres={"type": "int", "low": 4, "high": 30, "stepp": 2}),
        ["space.deq.f_thres", "did you mean 'step'"],
    ),
    (
        "empty choices",
        changed(space__deq__grad={"type": "categorical", "choices": []}),
        ["space.deq.grad.choices", "at least 1 item"],
    ),
    (
        "duplicate choices",
        changed(space__deq__grad={"type": "categorical", "choices": ["implicit", "implicit"]}),
        ["space.deq.grad", "duplicate"],
    ),
    (
        "non-scalar choice",
        changed(space__optim__betas={"type": "categorical", "choices": [[0.9, 0.99]]}),
        ["space.optim.betas.choices[0]", "expected bool | int | float | str | null"],
    ),
    (
        "key both fixed and searched",
        changed(overrides={"optim.lr": 0.001}),
        ["space.optim.lr", "once"],
    ),
    (
        "condition on a key not in the space",
        changed(
            space__deq__b_thres={
                "type": "int",
                "low": 4,
                "high": 40,
                "when": {"deq.gard": "implicit"},
            }
        ),
        ["space.deq.b_thres", "deq.gard", "did you mean 'deq.grad'"],
    ),
    (
        "condition on a value outside the parent's choices",
        changed(
            space__deq__b_thres={
                "type": "int",
                "low": 4,
                "high": 40,
                "when": {"deq.grad": "unrolled"},
            }
        ),
        ["space.deq.b_thres", "when.deq.grad", "unrolled"],
    ),
    (
        "condition on a later key",
        {
            **changed(),
            "space": {
                "deq.b_thres": {
                    "type": "int",
                    "low": 4,
                    "high": 40,
                    "when": {"deq.grad": "implicit"},
                },
                "deq.grad": {"type": "categorical", "choices": ["implicit", "phantom"]},
            },
            "points_to_evaluate": [],
        },
        ["space.deq.b_thres", "deq.grad comes after deq.b_thres", "move it before"],
    ),
    ("unknown sampler", changed(sampler={"name": "tpee"}), ["sampler.name", "did you mean 'tpe'"]),
    (
        "sampler option not accepted",
        changed(sampler={"name": "tpe", "n_startup_trial": 3}),
        ["sampler.n_startup_trial", "TPESampler", "did you mean 'n_startup_trials'"],
    ),
    (
        "sampler option refused by value",
        changed(sampler={"name": "nsga2", "population_size": 1}),
        ["sampler", "NSGAIISampler"],
    ),
    (
        "grid with a continuous float",
        changed(sampler={"name": "grid"}, points_to_evaluate=None),
        ["space.optim.lr", "grid", "step"],
    ),
    (
        "grid with a conditional entry",
        changed(
            sampler={"name": "grid"},
            space__optim__lr={"type": "categorical", "choices": [0.001, 0.01]},
            space__reg__jac_loss_weight=None,
            points_to_evaluate=None,
        ),
        ["space.deq.b_thres", "grid", "conditional"],
    ),
    ("unknown scheduler", changed(scheduler={"name": "ashaa"}), ["scheduler.name", "asha"]),
    (
        "asha grace_period < 1",
        changed(scheduler={"name": "asha", "grace_period": 0}),
        ["scheduler.grace_period", ">= 1"],
    ),
    (
        "asha reduction_factor < 2",
        changed(scheduler={"name": "asha", "reduction_factor": 1}),
        ["scheduler.reduction_factor", ">= 2"],
    ),
    (
        "asha grace_period beyond the trial",
        changed(scheduler={"name": "asha", "grace_period": 5}),  # 80 steps / 40 = 2 reports
        ["scheduler.grace_period", "max_t"],
    ),
    (
        "unknown asha option",
        changed(scheduler={"name": "asha", "grace_perod": 2}),
        ["scheduler.grace_perod", "did you mean 'grace_period'"],
    ),
    (
        "option of no scheduler",
        changed(scheduler={"name": "none", "grace_period": 2}),
        ["scheduler.grace_period", "'none'"],
    ),
    ("trials < 1", changed(trials=0), ["trials", ">= 1"]),
    ("trials missing", changed(trials=None), ["trials", "missing"]),
    ("concurrency < 1", changed(concurrency=0), ["concurrency", ">= 1"]),
    ("unknown resource", changed(resources={"gpus": 1}), ["resources.gpus", "gpus_per_worker"]),
    ("bad resource value", changed(resources={"workers": 0}), ["resources.workers", ">= 1"]),
    (
        "resource that breaks the batch",
        changed(resources={"workers": 3}),
        ["resources.workers", "batch_size"],
    ),
    ("bad seed", changed(seed=-1), ["seed"]),
    (
        "point with an unknown key",
        changed(points_to_evaluate=[{"optim.lrr": 0.01}]),
        ["points_to_evaluate[0].optim.lrr", "did you mean 'optim.lr'"],
    ),
    (
        "point outside the range",
        changed(points_to_evaluate=[{"optim.lr": 0.5}]),
        ["points_to_evaluate[0].optim.lr", "outside"],
    ),
    (
        "point off the step",
        changed(points_to_evaluate=[{"deq.f_thres": 5}]),
        ["points_to_evaluate[0].deq.f_thres", "outside"],
    ),
    (
        "point outside the choices",
        changed(points_to_evaluate=[{"deq.grad": "unrolled"}]),
        ["points_to_evaluate[0].deq.grad", "outside"],
    ),
    (
        "point with a conditional key whose condition is false",
        changed(points_to_evaluate=[{"deq.grad": "phantom", "deq.b_thres": 20}]),
        ["points_to_evaluate[0].deq.b_thres", "condition"],
    ),
    (
        "point with a conditional key without its parent",
        changed(points_to_evaluate=[{"deq.b_thres": 20}]),
        ["points_to_evaluate[0].deq.b_thres", "deq.grad"],
    ),
    (
        "point that makes an invalid experiment",
        {
            **changed(),
            "space": {
                "deq.f_thres": {"type": "int", "low": 2, "high": 30},
                "deq.f_thres_jitter": {"type": "int", "low": 0, "high": 3},
            },
            "points_to_evaluate": [{"deq.f_thres": 2, "deq.f_thres_jitter": 3}],
        },
        ["points_to_evaluate[0]", "f_thres_jitter must be in [0, f_thres)"],
    ),
    (
        "bound that makes an invalid experiment",
        {
            **changed(overrides={"optim.steps": 80, "optim.min_lr": 1.5e-3}),
            "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
            "points_to_evaluate": [],
        },
        ["space.optim.lr", "low 0.001", "optim.min_lr"],
    ),
    ("bad name", changed(name="a/b"), ["name"]),
]


@pytest.mark.parametrize("data, words", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_study(tmp_path, data, words):
    path = write(tmp_path, data, "bad_study.yaml")
    if words is None:
        load_study(path)
        return
    with pytest.raises(ConfigError) as info:
        load_study(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in: {msg}"


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("space: [unclosed")
    with pytest.raises(ConfigError, match="x.yaml: not valid YAML"):
        load_study(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="x.yaml: expected a mapping"):
        load_study(bad)
    with pytest.raises(ConfigError, match="quickstar.*did you mean 'quickstart'"):
        load_study("quickstar")


def test_objectives_are_the_metrics_the_task_declares(tmp_path):
    from deqray.config import load_config
    from deqray.train.report import report_metrics

    lm = report_metrics(load_config("markov-tiny"))
    assert {"val_ppl", "val_loss", "val_tokens", "fwd_nstep", "val_fwd_nstep"} <= set(lm)
    assert "val_acc" not in lm
    assert {"val_acc", "val_top5"} <= set(report_metrics(load_config("digits-tiny")))
    vision = changed(
        base="digits-tiny",
        overrides={"optim.steps": 60},
        space={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        points_to_evaluate=None,
    )
    s = load_study(
        write(tmp_path, {**vision, "objectives": {"val_acc": "max", "fwd_nstep": "min"}})
    )
    assert s.directions() == ["maximize", "minimize"] and s.is_multi_objective
    with pytest.raises(
        ConfigError, match="objectives.val_ppl: unknown metric 'val_ppl'.*'image_classification'"
    ):
        load_study(write(tmp_path, {**vision, "objectives": {"val_ppl": "min"}}))


# --------------------------------------------------------------------------- #
# sampling
# --------------------------------------------------------------------------- #


def test_suggest_respects_the_space_and_conditions(tmp_path):
    data = changed(
        space__optim__warmup_steps={"type": "int", "low": 1, "high": 64, "log": True},
        space__reg__jac_loss_freq={"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
        space__deq__phantom_steps={
            "type": "int",
            "low": 2,
            "high": 8,
            "when": {"deq.grad": ["phantom"]},
        },
        space__train__eval_sradius={"type": "categorical", "choices": [True, False]},
    )
    study = load_study(write(tmp_path, data))
    assert study.has_conditions
    ot = optuna.create_study(sampler=study.make_sampler(), direction="minimize")
    seen = set()
    for _ in range(40):
        trial = ot.ask()
        params = study.suggest(trial)
        assert params == trial.params
        assert 1e-4 <= params["optim.lr"] <= 1e-2
        assert 4 <= params["deq.f_thres"] <= 30 and params["deq.f_thres"] % 2 == 0
        assert 1 <= params["optim.warmup_steps"] <= 64
        assert params["reg.jac_loss_freq"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert params["train.eval_sradius"] in (True, False)
        grad = params["deq.grad"]
        seen.add(grad)
        assert ("deq.b_thres" in params) == (grad == "implicit")
        assert ("deq.phantom_steps" in params) == (grad == "phantom")
        for name, p in study.space.items():
            if name in params:
                assert p.contains(params[name]), (name, params[name])
        cfg = study.experiment(params)
        assert cfg.optim.lr == params["optim.lr"] and cfg.deq["grad"] == grad
        assert cfg.deq["f_thres"] == params["deq.f_thres"]
        assert cfg.optim.steps == 80 and cfg.train.seed == 0 and cfg.scaling.workers == 1
        if grad == "implicit":
            assert cfg.deq["b_thres"] == params["deq.b_thres"]
        ot.tell(trial, params["optim.lr"] + params["deq.f_thres"])
    assert seen == {"implicit", "phantom"}


def test_experiment_applies_overrides_resources_and_seed(tmp_path):
    data = changed(resources={"workers": 2, "cpus_per_worker": 0.5}, seed=7)
    data["overrides"] = {"optim": {"steps": 40}, "logging.histograms": False}
    s = load_study(write(tmp_path, data))
    cfg = s.experiment({"optim.lr": 0.003})
    assert (cfg.scaling.workers, cfg.scaling.cpus_per_worker, cfg.train.seed) == (2, 0.5, 7)
    assert cfg.optim.steps == 40 and cfg.logging.histograms is False and cfg.optim.lr == 0.003
    assert s.sampler.seed == 0 and s.seed == 7
    with pytest.raises(ConfigError, match="optim.lr"):
        s.experiment({"optim.lr": -1.0})


def test_make_sampler_classes_and_seeds(tmp_path):
    expect = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
    }
    for name, cls in expect.items():
        s = load_study(write(tmp_path, changed(sampler={"name": name, "seed": 3})))
        sampler = s.make_sampler()
        assert type(sampler) is cls
        # same seed, same first draws
        draws = []
        for _ in range(2):
            ot = optuna.create_study(sampler=s.make_sampler())
            draws.append([s.suggest(ot.ask()) for _ in range(3)])
        assert draws[0] == draws[1]
    # the study seed is the sampler's default
    by_study = load_study(write(tmp_path, changed(sampler={"name": "random"}, seed=5)))
    by_sampler = load_study(write(tmp_path, changed(sampler={"name": "random", "seed": 5})))
    assert by_study.sampler.seed is None and by_sampler.seed == 0
    firsts = [
        s.suggest(optuna.create_study(sampler=s.make_sampler()).ask())
        for s in (by_study, by_sampler)
    ]
    assert firsts[0] == firsts[1]
    # TPE over a conditional space: the multivariate TPE with the group decomposition
    sampler = load_study(write(tmp_path, changed(sampler={"name": "tpe"}))).make_sampler()
    assert sampler._multivariate and sampler._group
    opts = load_study(write(tmp_path, changed(sampler={"name": "nsga2", "population_size": 4})))
    assert opts.make_sampler()._population_size == 4


def test_grid_enumerates_the_full_product(tmp_path):
    data = changed(
        sampler={"name": "grid", "seed": 1},
        space={
            "deq.f_thres": {"type": "int", "low": 4, "high": 8, "step": 2},
            "deq.f_solver": ["anderson", "broyden"],
            "reg.jac_loss_weight": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
        },
        trials=None,
        points_to_evaluate=None,
    )
    s = load_study(write(tmp_path, data))
    assert isinstance(s.make_sampler(), optuna.samplers.GridSampler)
    assert s.trials == 3 * 2 * 3
    ot = optuna.create_study(sampler=s.make_sampler())
    ot.optimize(lambda t: float(s.suggest(t)["deq.f_thres"]), n_trials=s.trials)
    got = {tuple(t.params[k] for k in s.space) for t in ot.trials}
    want = set(itertools.product([4, 6, 8], ["anderson", "broyden"], [0.0, 0.1, 0.2]))
    assert got == want
    with pytest.raises(ConfigError, match="trials: 19 is more than the grid's 18 points"):
        load_study(write(tmp_path, {**data, "trials": 19}))


def test_param_helpers():
    p = Param("deq.f_thres", "int", low=4, high=10, step=2)
    assert p.grid() == [4, 6, 8, 10] and p.contains(6) and not p.contains(5)
    assert not p.contains(6.0) and not p.contains(True)
    c = Param("x.y", "categorical", choices=[1, "a", None])
    assert c.contains(None) and not c.contains(True) and c.contains(1)
    f = Param("a.b", "float", low=0.0, high=1.0, step=0.1)
    assert f.grid()[3] == 0.3 and f.contains(0.7) and not f.contains(0.75)
    assert "step 0.1" in f.describe()
    cond = Param("d.e", "int", low=1, high=4, when={"deq.grad": ["implicit"]})
    assert "when deq.grad = implicit" in cond.describe()
    assert cond.active({"deq.grad": "implicit"}) and not cond.active({"deq.grad": "phantom"})
    assert not cond.active({})


# --------------------------------------------------------------------------- #
# the Pareto front
# --------------------------------------------------------------------------- #


def brute_force_front(rows, objectives):
    def values(row):
        out = []
        for k, d in objectives.items():
            v = row.get(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                return None
            out.append(v if d == "min" else -v)
        return out

    vals = [values(r) for r in rows]
    front = []
    for i, a in enumerate(vals):
        if a is None:
            continue
        dominated = False
        for j, b in enumerate(vals):
            if j == i or b is None:
                continue
            if all(x <= y for x, y in zip(b, a, strict=True)) and any(
                x < y for x, y in zip(b, a, strict=True)
            ):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


@pytest.mark.parametrize("seed", range(8))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    k = rng.choice([1, 2, 3])
    names = ["val_ppl", "fwd_nstep", "val_acc"][:k]
    objectives = {n: rng.choice(["min", "max"]) for n in names}
    rows = []
    for _ in range(rng.randint(0, 60)):
        row = {n: float(rng.randint(0, 6)) for n in names}  # small ints: many ties
        r = rng.random()
        if r < 0.08:
            row.pop(rng.choice(names))
        elif r < 0.16:
            row[rng.choice(names)] = rng.choice([math.nan, math.inf, -math.inf, None, "x"])
        rows.append(row)
        if rng.random() < 0.2:
            rows.append(dict(row))  # an exact duplicate
    assert pareto_front(rows, objectives) == brute_force_front(rows, objectives)


def test_pareto_front_cases():
    obj = {"val_acc": "max", "fwd_nstep": "min"}
    rows = [
        {"val_acc": 0.9, "fwd_nstep": 10},
        {"val_acc": 0.9, "fwd_nstep": 10},  # duplicate of a front point: both stay
        {"val_acc": 0.8, "fwd_nstep": 10},  # dominated
        {"val_acc": 0.7, "fwd_nstep": 4},
        {"val_acc": math.nan, "fwd_nstep": 1},  # never on the front
        {"fwd_nstep": 1},
        {"val_acc": 0.95, "fwd_nstep": math.inf},
    ]
    assert pareto_front(rows, obj) == [0, 1, 3]
    assert pareto_front([], obj) == []
    assert pareto_front(rows, {"fwd_nstep": "minimize"}) == [4, 5]
    with pytest.raises(ValueError):
        pareto_front(rows, {"val_acc": "up"})
