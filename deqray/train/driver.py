"""The driver side of a training run: data, run name, TorchTrainer, the final summary.

    result = deqray.train.fit("markov-tiny", ["optim.steps=200"], workers=2)
    result.return_value["status"]     # "finished", "stopped" or "diverged" (with "reason")
    result.metrics                    # the last checkpointed report
    result.path                       # <storage>/<name>: checkpoints, metrics.jsonl, tensorboard/

A run is the directory `<storage>/<name>`. Without a name, a new unique one
is made, so nothing is resumed or overwritten by accident; with the name of
an existing run, Ray Train resumes it from its latest checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from deqray.config import EMBEDDED, ConfigError, Experiment, load_config
from deqray.data._fs import locate

from .loop import METRICS_FILE, STATUS_FILE, train_loop_per_worker

DEFAULT_STORAGE = "runs"
MATERIALIZE_BYTES = 256 << 20  # decoded image splits up to this size are decoded once


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #


def embedded_root(cfg: Experiment) -> str:
    """Where the embedded set of `cfg` lives: one directory per (source, options)."""
    cache = cfg.data.cache or os.path.join(os.path.expanduser("~"), ".cache", "deqray", "data")
    key = json.dumps(cfg.data.options, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return os.path.join(os.path.abspath(cache), f"{cfg.data.source}-{digest}")


def prepare_data(cfg: Experiment, verbose: bool = True):
    """The manifest of the run's data; an embedded set is generated once (under a file lock)."""
    from deqray.data import DataError, load_manifest

    if cfg.data.source not in EMBEDDED:
        try:
            return load_manifest(cfg.data.source)
        except (DataError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"data.source: {e}") from None
    root = embedded_root(cfg)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    # Concurrent trials of a sweep may all start by generating the same set.
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if cfg.data.source == "markov":
                from deqray.data.markov import write_markov_corpus

                return write_markov_corpus(None, root, progress=verbose, **cfg.data.options)
            from deqray.data.digits import write_digits

            return write_digits(None, root, progress=verbose, **cfg.data.options)
        except TypeError as e:
            raise ConfigError(f"data.options: {e}") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_context(cfg: Experiment, manifest) -> dict[str, Any]:
    """Everything the workers derive from the config and the data, decided once here."""
    from deqray.models import make_config

    model_cfg = cfg.model_config()
    from deqray.models.registry import family_of

    family = family_of(model_cfg)
    lm = family == "deq_transformer"
    want = "lm" if lm else "vision"
    if manifest.kind != want:
        raise ConfigError(
            f"data.source: {manifest.root} holds {manifest.kind!r} data; model "
            f"{cfg.model.get('preset', family)!r} needs {want!r} data"
        )
    W = cfg.scaling.workers
    B = cfg.optim.batch_size // W
    EB = (cfg.optim.eval_batch_size or cfg.optim.batch_size) // W
    train = cfg.data.train_split
    if train not in manifest.splits:
        raise ConfigError(
            f"data.train_split: {manifest.root} has no split {train!r}; "
            f"splits: {', '.join(manifest.splits)}"
        )
    eval_split = cfg.data.eval_split
    if eval_split is None:
        others = [s for s in manifest.splits if s != train]
        pick = "valid" if lm and "valid" in others else ("test" if "test" in others else None)
        eval_split = pick or (others[0] if others else None)
    if eval_split not in manifest.splits:
        raise ConfigError(
            f"data.eval_split: {manifest.root} has no split {eval_split!r}; "
            f"splits: {', '.join(manifest.splits)}"
        )
    ctx: dict[str, Any] = {
        "family": "lm" if lm else "vision",
        "eval_split": eval_split,
        "batch_per_worker": B,
        "eval_batch_per_worker": EB,
        "ignore_index": getattr(model_cfg, "ignore_index", 255),
    }
    if lm:
        vocab = int(manifest.meta.get("vocab_size", 0))
        cutoffs = list(getattr(model_cfg, "cutoffs", []) or [])
        if cutoffs and max(cutoffs) >= vocab:
            raise ConfigError(
                f"model.cutoffs {cutoffs} do not fit the data's vocabulary of {vocab} "
                f"({manifest.root})"
            )
        model_cfg = make_config(model_cfg, vocab_size=vocab)
        tgt = cfg.data.tgt_len or model_cfg.tgt_len
        ctx["tgt_len"] = tgt
        ctx["eval_tgt_len"] = cfg.data.eval_tgt_len or tgt
        tokens = manifest.splits[train].rows
        lane = (tokens - 1) // (W * B)
        if lane < 2:
            raise ConfigError(
                f"optim.batch_size: {cfg.optim.batch_size} rows leave lanes of {lane} tokens in "
                f"the {tokens:,}-token training split"
            )
        ctx["steps_per_epoch"] = math.ceil(lane / tgt)
        ctx["items_per_step"] = cfg.optim.batch_size * tgt
        ctx["task"] = "lm"
    else:
        classes = int(manifest.meta.get("num_classes", 0))
        size = cfg.data.image_size
        changes: dict[str, Any] = {"num_classes": classes} if classes else {}
        if size is not None:
            changes["image_size"] = (size, size)
        model_cfg = make_config(model_cfg, **changes) if changes else model_cfg
        rows = manifest.splits[train].rows
        steps = (rows // W) // B
        if steps < 1:
            raise ConfigError(
                f"optim.batch_size: {cfg.optim.batch_size} is larger than the "
                f"{rows}-image training split"
            )
        ctx["steps_per_epoch"] = steps
        ctx["items_per_step"] = cfg.optim.batch_size
        ctx["task"] = model_cfg.task
        ctx["num_classes"] = model_cfg.num_classes
        ctx["image_size"] = list(model_cfg.image_size)
    ctx["model"] = {"family": family, **dataclasses.asdict(model_cfg)}
    o = cfg.optim
    ctx["total_steps"] = (
        o.steps if o.steps is not None else math.ceil(o.epochs * ctx["steps_per_epoch"])
    )
    ctx["pretrain_steps"] = cfg.pretrain_steps()
    return ctx


def datasets_for(cfg: Experiment, manifest, ctx: dict):
    """(datasets, dataset_config) for TorchTrainer."""
    train, ev = cfg.data.train_split, ctx["eval_split"]
    if ctx["family"] == "lm":
        from deqray.data.lm import lm_ingest

        return lm_ingest(
            manifest.root,
            {train: ctx["batch_per_worker"], ev: ctx["eval_batch_per_worker"]},
            splits=(train, ev),
            read_cpus=cfg.data.read_cpus,
        )
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    from deqray.data.vision import vision_datasets

    d = cfg.data
    augment = d.augment and not d.deterministic
    # Datasets keep a copy of the context they were made in: no per-epoch
    # progress bars in the training log, without changing the caller's context.
    # With deterministic data, the splits decoded once below must also keep
    # the read order (a materialised split is executed here, not by Train).
    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.execution_options
    context.enable_progress_bars = False
    if d.deterministic:
        context.execution_options = copy.deepcopy(saved[1])
        context.execution_options.preserve_order = True
    try:
        datasets = _vision(cfg, manifest, ctx, vision_datasets, augment)
    finally:
        context.enable_progress_bars, context.execution_options = saved
    if cfg.train.eval_batches is not None:
        # A split iterator must be read to its end: cap the data, not the loop.
        per_eval = cfg.train.eval_batches * ctx["eval_batch_per_worker"] * cfg.scaling.workers
        datasets[ev] = datasets[ev].limit(per_eval)
    # Every pass over a split starts its decode actors afresh (seconds: they
    # import torch). A small split that is the same on every pass is decoded
    # once, here: the evaluation split, and the training split without
    # augmentation.
    pixels = 3 * ctx["image_size"][0] * ctx["image_size"][1] * 4
    rows = {s: manifest.splits[s].rows for s in (train, ev)}
    if rows[ev] * pixels <= MATERIALIZE_BYTES:
        datasets[ev] = datasets[ev].materialize()
    if not augment and rows[train] * pixels <= MATERIALIZE_BYTES:
        datasets[train] = datasets[train].materialize()
        if d.shuffle and not d.deterministic:
            datasets[train] = datasets[train].randomize_block_order()
    options = None
    if d.deterministic:
        options = ExecutionOptions()
        options.preserve_order = True
    return datasets, DataConfig(datasets_to_split=[train, ev], execution_options=options)


def _vision(cfg, manifest, ctx, vision_datasets, augment):
    d, train, ev = cfg.data, cfg.data.train_split, ctx["eval_split"]
    aug: dict[str, Any] = {} if augment else {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip": 0.0}
    return vision_datasets(
        manifest.root,
        splits=[train, ev],
        train_split=train,
        size=ctx["image_size"],
        actors=d.decode_actors,
        actor_cpus=d.decode_cpus,
        shuffle=d.shuffle and not d.deterministic,
        seed=cfg.train.seed,
        **aug,
    )


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


def trainer_for(cfg: Experiment, *, callbacks=None, verbose: bool = True):
    """(TorchTrainer, run name, run URI) for a validated config: data prepared, name decided."""
    import ray.train
    from ray.train.torch import TorchTrainer

    manifest = prepare_data(cfg, verbose)
    ctx = run_context(cfg, manifest)
    datasets, data_config = datasets_for(cfg, manifest, ctx)
    name = cfg.checkpoint.name or new_run_name(cfg)
    storage = storage_uri(cfg)
    run_uri = storage.rstrip("/") + "/" + name
    s = cfg.scaling
    cpus = (
        s.cpus_per_worker if s.cpus_per_worker is not None else (1.0 if s.gpus_per_worker else 0.5)
    )
    resources = {"CPU": cpus}
    if s.gpus_per_worker:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.to_dict(), "context": ctx, "run_uri": run_uri},
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
    return trainer, name, run_uri, ctx


def fit(
    config: Experiment | str | os.PathLike | dict,
    overrides: list[str] | dict | None = None,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    storage: str | None = None,
    name: str | None = None,
    callbacks=None,
    verbose: bool = True,
):
    """Train a DEQ with Ray Train; returns the Ray `Result`.

    `result.return_value` is the run's end: {"status": "finished" | "stopped"
    | "diverged", "reason", "step", "metrics"}; `result.metrics` is the last
    checkpointed report. Starts a local Ray instance when none is running.
    """
    from deqray.data._ray import connect

    cfg = resolve(
        config,
        overrides,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        storage=storage,
        name=name,
    )
    connect()
    trainer, run_name, run_uri, ctx = trainer_for(cfg, callbacks=callbacks, verbose=verbose)
    resuming = cfg.checkpoint.name is not None and locate(run_uri).exists()
    if verbose:
        what = "resuming" if resuming else "starting"
        print(
            f"[deqray] {what} run {run_name}: {ctx['total_steps']} steps "
            f"({ctx['steps_per_epoch']} per epoch, {ctx['pretrain_steps']} pretraining), "
            f"{cfg.scaling.workers} worker(s); run directory {run_uri}",
            flush=True,
        )
    result = trainer.fit()
    if result.return_value is None:  # e.g. a resumed run that was already complete
        result.return_value = read_status(run_uri)
    if verbose:
        print(summary(result, run_uri), flush=True)
    return result


def read_status(run_uri: str) -> dict | None:
    loc = locate(run_uri).join(STATUS_FILE)
    return json.loads(loc.read_bytes()) if loc.exists() else None


def read_metrics(run_uri: str) -> list[dict]:
    """The run's reports in step order; a step reported twice (after a restore) keeps the last.
    Works on a live run: a last line still being written is left out."""
    loc = locate(run_uri).join(METRICS_FILE)
    if not loc.exists():
        return []
    rows: dict[int, dict] = {}
    for line in loc.read_bytes().decode().split("\n")[:-1]:
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def summary(result, run_uri: str) -> str:
    end = result.return_value or {}
    m = end.get("metrics") or result.metrics or {}
    lines = [f"[deqray] run {run_uri}: {end.get('status', 'unknown')} at step {end.get('step')}"]
    if end.get("reason"):
        lines.append(f"  reason: {end['reason']}")
    keys = [
        ("val_ppl", "val perplexity", ".3f"),
        ("val_acc", "val accuracy", ".4f"),
        ("val_miou", "val mIoU", ".4f"),
        ("val_loss", "val loss", ".4f"),
        ("train_loss", "train loss", ".4f"),
        ("fwd_nstep", "forward steps", ".1f"),
        ("fwd_converged", "forward converged", ".3f"),
        ("bwd_nstep", "backward steps", ".1f"),
        ("items_per_s", "throughput /s", ",.0f"),
    ]
    for key, label, fmt in keys:
        v = m.get(key)
        if isinstance(v, (int, float)):
            lines.append(f"  {label:<18} {v:{fmt}}")
    if result.checkpoint is not None:
        lines.append(f"  checkpoint         {result.checkpoint.path}")
    lines.append(f"  tensorboard --logdir {run_uri}/tensorboard")
    return "\n".join(lines)
