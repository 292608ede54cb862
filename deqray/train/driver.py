"""The driver side of a training run: data, run name, TorchTrainer, the final summary.

    result = deqray.train.fit("markov-tiny", ["optim.steps=200"], workers=2)
    result.return_value["status"]     # "finished", "stopped" or "diverged" (with "reason")
    result.metrics                    # the last checkpointed report
    result.path                       # <storage>/<name>: checkpoints, metrics.jsonl, tensorboard/

A run is the directory `<storage>/<name>`. Without a name, a new unique one
is made, so nothing is resumed or overwritten by accident; with the name of
an existing run, Ray Train resumes it from its latest checkpoint. The task
(`cfg.get_task()`) reads the data and plans the run (`context.plan_run`);
the workers get that typed context as it is.
"""

from __future__ import annotations

import copy
import os
import secrets
import time
from pathlib import Path
from typing import Any

from deqray.config import Experiment, load_config
from deqray.data._fs import locate
from deqray.tasks import RunContext
from deqray.tracking import default_experiment_name

from . import files
from .console import summary
from .context import plan_run
from .report import task_metrics
from .worker import train_loop_per_worker

DEFAULT_STORAGE = "runs"
read_status, read_metrics = files.read_status, files.read_metrics


# --------------------------------------------------------------------------- #
# the run
# --------------------------------------------------------------------------- #


def new_run_name(cfg: Experiment) -> str:
    stem = Path(cfg.source).stem if cfg.source else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def storage_uri(cfg: Experiment) -> str:
    s = cfg.checkpoint.storage or DEFAULT_STORAGE
    return s if "://" in s else os.path.abspath(os.path.expanduser(s))


def resolve(
    config: Experiment | str | os.PathLike | dict,
    overrides: list[str] | dict | None = None,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    storage: str | None = None,
    name: str | None = None,
) -> Experiment:
    """The experiment config with the overrides and command-line settings applied (validated)."""
    if isinstance(config, Experiment):
        cfg = config.with_overrides(overrides) if overrides else config
    elif isinstance(config, dict):
        from deqray.config import parse_overrides

        ov = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else overrides
        cfg = Experiment.from_dict(config, "config", ov)
    else:
        cfg = load_config(config, overrides)
    extra: dict[str, Any] = {}
    if workers is not None:
        extra["scaling.workers"] = workers
    if gpus_per_worker is not None:
        extra["scaling.gpus_per_worker"] = gpus_per_worker
    if storage is not None:
        extra["checkpoint.storage"] = storage
    if name is not None:
        extra["checkpoint.name"] = name
    if extra:
        source = cfg.source
        cfg = cfg.with_overrides(extra)
        cfg.source = source
    return cfg


def unsplit_for_one_worker(data_config, workers: int):
    """A plain `ray.train.DataConfig` for a single worker, with no split: one worker's
    split is the whole dataset in the same order, but each split costs a
    SplitCoordinator actor that starts before the first batch (docs/ray-notes.md,
    "What a fit costs on 2 CPUs"); unsplit, the worker executes the dataset itself.
    None is TorchTrainer's default, `DataConfig()`, which splits every dataset. A
    DataConfig with a `configure` of its own (the language model's lanes) is kept."""
    from ray.train import DataConfig

    if workers != 1:
        return data_config
    if data_config is None:
        return DataConfig(datasets_to_split=[])
    if type(data_config).configure is not DataConfig.configure:
        return data_config
    unsplit = copy.copy(data_config)
    unsplit._datasets_to_split = []  # the constructor's `datasets_to_split`, kept private by Ray
    return unsplit


def trainer_for(cfg: Experiment, *, callbacks=None, verbose: bool = True, hooks=None, board=None):
    """(TorchTrainer, run name, run URI, RunContext) for a validated config: the task's
    data prepared, the run planned and named. `board` (`tensorboard.TrialBoard`): a
    study trial's HParams and objectives for its TensorBoard run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    name = cfg.checkpoint.name or new_run_name(cfg)
    storage = storage_uri(cfg)
    run_uri = storage.rstrip("/") + "/" + name
    run = plan_run(cfg, run_uri)
    datasets, data_config = run.task.datasets(run)
    s = cfg.scaling
    data_config = unsplit_for_one_worker(data_config, s.workers)
    cpus = (
        s.cpus_per_worker if s.cpus_per_worker is not None else (1.0 if s.gpus_per_worker else 0.5)
    )
    resources = {"CPU": cpus}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": run, "hooks": list(hooks or []), "board": board},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.workers, use_gpu=bool(s.gpus_per_worker), resources_per_worker=resources
        ),
        datasets=datasets,
        dataset_config=data_config,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer, name, run_uri, run


def fit(
    config: Experiment | str | os.PathLike | dict,
    overrides: list[str] | dict | None = None,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    storage: str | None = None,
    name: str | None = None,
    callbacks=None,
    hooks=None,
    verbose: bool = True,
):
    """Train a DEQ with Ray Train; returns the Ray `Result`.

    `result.return_value` is the run's end: {"status": "finished" | "stopped"
    | "diverged", "reason", "step", "metrics"}; `result.metrics` is the last
    checkpointed report. `hooks` (`deqray.train.hooks.Hooks`) go to every
    worker. Starts a local Ray instance when none is running; a user task's
    package travels to the workers with it (`deqray.tasks.registry.runtime_env_for`).
    """
    from deqray.data._ray import connect
    from deqray.tasks.registry import runtime_env_for

    cfg = resolve(
        config,
        overrides,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        storage=storage,
        name=name,
    )
    connect(runtime_env=runtime_env_for(cfg.task) or None)
    trainer, run_name, run_uri, run = trainer_for(
        cfg, callbacks=callbacks, verbose=verbose, hooks=hooks
    )
    resuming = cfg.checkpoint.name is not None and locate(run_uri).exists()
    if verbose:
        print(start_line(run, resuming), flush=True)
        if cfg.tracking.mlflow.uri is not None:
            m, name = cfg.tracking.mlflow, default_experiment_name(cfg)
            print(f"[deqray] mlflow: {m.uri}, experiment {m.experiment_name or name}", flush=True)
    result = trainer.fit()
    if result.return_value is None:  # e.g. a resumed run that was already complete
        result.return_value = read_status(run_uri)
    if verbose:
        end = result.return_value or {}
        m = end.get("metrics") or result.metrics or {}
        keys = [m.name for m in task_metrics(cfg)]
        print(summary(end, m, keys, run_uri, result.checkpoint), flush=True)
    return result


def start_line(run: RunContext, resuming: bool) -> str:
    name = run.run_uri.rstrip("/").rsplit("/", 1)[-1]
    return (
        f"[deqray] {'resuming' if resuming else 'starting'} run {name} ({run.task.name}): "
        f"{run.total_steps} steps ({run.steps_per_epoch} per epoch, {run.pretrain_steps} "
        f"pretraining), {run.batching.workers} worker(s); run directory {run.run_uri}"
    )
