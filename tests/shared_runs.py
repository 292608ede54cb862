"""Training runs that several test files read, each trained once per test session.

Every fit pays some 20 s on 2 cores before its first step (Ray Train's
controller and workers start, the task prepares its data), however short the
run. Tests that only read a run's results therefore share one: the first
test that asks for a run trains it, later ones get the same `Run`, whose
directories come from the session's `tmp_path_factory`. A run that failed
to train fails every later test that asks for it, without training again.
The caller holds the session's Ray (the `ray_session` fixture).

* `language_model`: a DEQ-Transformer trained by 2 workers with everything a
  resume must restore switched on, tracked to the session's MLflow server
  (tests/test_train.py checks it, tests/test_evaluate.py evaluates it,
  tests/test_tracking.py reads its MLflow run). It is also the language
  model's run of the task contract.
* `contract_run(task)`: the uninterrupted run of tests/test_tasks_contract.py
  for each task (tests/test_evaluate.py evaluates the classifier's,
  tests/test_examples.py resumes the example task's through the CLI,
  tests/test_train.py checks segmentation's evaluation over two workers).
* `interrupted_run(task)`: the same run with a worker killed on the way,
  resumed by Ray Train from its checkpoint (the contract's resume test). The
  language model's is also stopped by its driver first and resumed by a new
  driver that names it (tests/test_train.py checks both halves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deqray.train.driver import fit

ROOT = Path(__file__).resolve().parents[1]

# A small corpus and model; losses must fall within a few dozen steps. The
# test split is small: tests/test_evaluate.py runs all of it twice, segment by segment.
MARKOV = "data.options={tokens: 20000, test_tokens: 600}"  # one corpus for every test
LM = [
    "model.preset=deq-transformer-tiny",
    "data.source=markov",
    MARKOV,
    "data.tgt_len=16",
    "optim.batch_size=8",
    "optim.lr=0.003",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "train.eval_batches=4",
    "train.log_every=1000",
    "checkpoint.keep=null",
]
LM_EVAL_TGT_LEN = 12  # evaluation segments unlike the training ones (16)
# Dropout and f_thres jitter on, the Jacobian loss on a random half of the
# steps, the spectral radius at every evaluation, and memory across segments:
# everything a resume must restore.
LM_RUN = [
    *LM,
    f"data.eval_tgt_len={LM_EVAL_TGT_LEN}",
    "optim.steps=24",
    "train.pretrain_steps=6",
    "train.eval_every=6",
    "train.eval_sradius=true",
    "model.dropout=0.1",
    "deq.f_thres_jitter=3",
    "reg.jac_loss_weight=0.5",
    "reg.jac_loss_freq=0.5",
]
LM_WORKERS = 2

# The task contract's runs (tests/test_tasks_contract.py): the Jacobian loss and
# the spectral radius on, so that every metric is reported; one worker, but two
# for segmentation, whose evaluation over both workers' halves of the test split
# tests/test_train.py checks on the same run (one fit fewer). The language
# model's is the shared run above (LM_RUN: two fits fewer).
LANGUAGE_MODEL = "language_model"
COMMON = [
    "optim.steps=16",
    "train.pretrain_steps=4",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.eval_sradius=true",
    "train.log_every=1000",
    "reg.jac_loss_weight=0.1",
    "reg.jac_loss_freq=1.0",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "checkpoint.keep=null",
]
TASKS = {
    LANGUAGE_MODEL: ({"optim": {"steps": 1}}, LM_RUN),
    # The digits as a user's preprocessed set (data.source=<its directory>, added
    # by _contract_overrides): tests/test_evaluate.py moves it to see the error.
    "image_classification": (
        "digits-tiny",
        ["data.deterministic=true", "optim.batch_size=16", "optim.lr=0.003"],
    ),
    "segmentation": (
        "shapes-mdeq-tiny",
        [
            "data.options={train_images: 64, test_images: 16, size: 16}",
            "data.crop_size=[16, 16]",
            "data.deterministic=true",
            "optim.batch_size=8",
            "deq.f_thres=8",
            "deq.b_thres=8",
        ],
    ),
    "deblur (examples/)": (
        str(ROOT / "examples/deblur/experiment.yaml"),
        ["optim.batch_size=16", "optim.lr=0.01", "data.train_size=512", "data.eval_size=64"],
    ),
}


CONTRACT_WORKERS = {"segmentation": 2, LANGUAGE_MODEL: LM_WORKERS}  # else 1
# Where the contract's worker dies, and the language model's driver stops before it.
FAULT_STEP = {LANGUAGE_MODEL: 22}  # else 10
LM_STOP_STEP = 12


@dataclass(frozen=True)
class Run:
    config: Any  # what fit() was given: a config name, file or dict
    overrides: list[str]  # every override, data.cache included
    workers: int
    storage: Path
    result: Any  # the ray.train.Result

    @property
    def path(self) -> str:
        return self.result.path


_DONE: dict[str, Any] = {}  # name -> Run, or the exception its training raised


def _once(name: str, make):
    if name not in _DONE:
        try:
            _DONE[name] = make()
        except Exception as e:
            _DONE[name] = e
            raise
    done = _DONE[name]
    if isinstance(done, Exception):
        raise RuntimeError(f"the shared run {name!r} failed to train earlier") from done
    return done


def data_cache(tmp_path_factory) -> Path:
    """The session's embedded data sets (generated once, keyed by source and options)."""
    return _once("data cache", lambda: tmp_path_factory.mktemp("data-cache"))


def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits written as a deqray data set, in a directory of their own."""

    def write():
        from deqray.data.digits import write_digits

        root = tmp_path_factory.mktemp("digits") / "set"
        write_digits(None, str(root), progress=False)
        return root

    return _once("digits", write)


def _train(name: str, config, overrides: list[str], workers: int, tmp_path_factory) -> Run:
    def make():
        storage = tmp_path_factory.mktemp("runs")
        result = fit(config, overrides, workers=workers, storage=str(storage), verbose=False)
        return Run(config, overrides, workers, storage, result)

    return _once(name, make)


def language_model(tmp_path_factory, mlflow_uri: str) -> Run:
    """`mlflow_uri`: the session's server (conftest's `session_mlflow_uri`)."""
    cache = data_cache(tmp_path_factory)
    overrides = [*LM_RUN, f"data.cache={cache}", f"tracking.mlflow.uri={mlflow_uri}"]
    config = TASKS[LANGUAGE_MODEL][0]
    return _train("language model", config, overrides, LM_WORKERS, tmp_path_factory)


def _contract_overrides(task: str, tmp_path_factory) -> list[str]:
    _, overrides = TASKS[task]
    extra = [f"data.cache={data_cache(tmp_path_factory)}"]
    if task == "image_classification":
        extra.append(f"data.source={digits(tmp_path_factory)}")
    return [*COMMON, *overrides, *extra]


def contract_run(task: str, tmp_path_factory, mlflow_uri: str | None = None) -> Run:
    """`mlflow_uri`: the session's MLflow server, for the language model (its run tracks)."""
    if task == LANGUAGE_MODEL:
        if mlflow_uri is None:
            raise ValueError("the language model's run tracks to MLflow: pass mlflow_uri")
        return language_model(tmp_path_factory, mlflow_uri)
    config = TASKS[task][0]
    overrides = _contract_overrides(task, tmp_path_factory)
    workers = CONTRACT_WORKERS.get(task, 1)
    return _train(f"contract: {task}", config, overrides, workers, tmp_path_factory)


@dataclass(frozen=True)
class Interrupted:
    run: Run  # the run that went on to its end, its worker killed at `fault_step`
    fault_step: int
    stopped: Any = None  # the language model's: the ray.train.Result of the stopped driver


def interrupted_run(task: str, tmp_path_factory, mlflow_uri: str | None = None) -> Interrupted:
    """`contract_run(task)` again, in the same storage, with a worker killed at
    FAULT_STEP and one restart allowed. For the language model, rank 1 dies, after
    a first driver stopped the run at LM_STOP_STEP and a second one resumed it by
    its name."""
    whole = contract_run(task, tmp_path_factory, mlflow_uri)
    step = FAULT_STEP.get(task, 10)
    fault = [f"debug.fail_at_step={step}", "checkpoint.max_failures=1"]

    def make():
        stopped, name, overrides = None, None, [*whole.overrides, *fault]
        if task == LANGUAGE_MODEL:
            stopped = fit(
                whole.config,
                [*whole.overrides, f"train.stop_at_step={LM_STOP_STEP}"],
                workers=whole.workers,
                storage=str(whole.storage),
                verbose=False,
            )
            name, overrides = Path(stopped.path).name, [*overrides, "debug.fail_rank=1"]
        result = fit(
            whole.config,
            overrides,
            workers=whole.workers,
            storage=str(whole.storage),
            name=name,
            verbose=False,
        )
        return Interrupted(
            Run(whole.config, overrides, whole.workers, whole.storage, result), step, stopped
        )

    return _once(f"interrupted: {task}", make)
