"""What a training run needs besides the model: optimiser, schedule, RNG, checkpoints.

A checkpoint is one directory with `state.pt` (written by rank 0):
model, optimiser and scheduler state, the step, the data position (epoch
and batches read in it), the task's state (e.g. Transformer-XL memory) and
RNG states of every rank (gathered to rank 0, so that each rank gets its own
back), divergence counters, and the config it was trained with. Restoring
all of it is what makes a resumed run continue the same trajectory.

Checkpoints hold tensors and plain Python values only (the numpy RNG state
is stored as a tensor), and are read with `torch.load(weights_only=True)`:
a checkpoint from someone else's bucket cannot run code when it is loaded.
One that would need to (a pickle with a callable in it) is refused with
`CheckpointError`, naming the file.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deqray.config import Experiment, Optim

STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def make_optimizer(params, o: Optim) -> torch.optim.Optimizer:
    if o.name == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(step: int, o: Optim, total_steps: int) -> float:
    """Linear warmup from 0, then cosine down to min_lr (or constant), as a factor of lr."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    floor = o.min_lr / o.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, o: Optim, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, total_steps))


def jac_weight(step: int, pretrain_steps: int, cfg: Experiment) -> float:
    """The Jacobian loss weight at `step` (a function of the step only, so resumes agree).

    Pretraining steps use `pretrain_jac_loss_weight`; DEQ steps start at
    `jac_loss_weight` and gain 0.1 every `jac_incremental` DEQ steps; from
    `jac_stop_step` on the weight is 0.
    """
    r = cfg.reg
    if r.jac_stop_step is not None and step >= r.jac_stop_step:
        return 0.0
    if step < pretrain_steps:
        return r.pretrain_jac_loss_weight
    w = r.jac_loss_weight
    if r.jac_incremental > 0 and w > 0:
        w += 0.1 * ((step - pretrain_steps) // r.jac_incremental)
    return w


def jac_this_step(step: int, seed: int, freq: float) -> bool:
    """Whether `step` computes the Jacobian loss: the same answer on every rank and on resume."""
    if freq <= 0:
        return False
    if freq >= 1:
        return True
    return random.Random(f"jac-{seed}-{step}").random() < freq


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # a tensor and plain values instead of numpy objects: loadable with weights_only
        "numpy": (
            str(kind),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Progress:
    """Where the run is: what a checkpoint restores besides the tensors."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # current epoch of the training split
    batch_in_epoch: int = 0  # batches of that epoch consumed
    bad_evals: int = 0  # evaluations in a row with a non-converging forward
    best: dict = field(default_factory=dict)  # last evaluation's metrics


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere); the object itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def to_device(value: Any, device: Any) -> Any:
    """A task's state on `device`: tensors moved, tuples / lists / dicts rebuilt as plain ones
    (a NamedTuple becomes a tuple: what a weights-only checkpoint can hold)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        items = [to_device(v, device) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def save_state(
    path: str,
    *,
    model: nn.Module,
    optimizer,
    scheduler,
    progress: Progress,
    per_rank: list[dict],
    config: dict,
    model_config: Any = None,
) -> None:
    """Write state.pt into the directory `path` (rank 0). `model_config` (the run's, with the
    data's sizes filled in) is kept so that the model can be rebuilt without the data."""
    torch.save(
        {
            "model_config": None if model_config is None else model_record(model_config),
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "progress": dict(progress.__dict__),
            "per_rank": per_rank,  # [{"rng": ..., "state": ...}] by rank
            "config": config,
            "torch_version": str(torch.__version__),
        },
        os.path.join(path, STATE_FILE),
    )


def model_record(cfg: Any) -> dict:
    """A model config dataclass as plain values: its class by import path and its fields."""
    import dataclasses

    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"a model config must be a dataclass to be checkpointed, got {cfg!r}")
    cls = type(cfg)
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "fields": dataclasses.asdict(cfg)}


def model_from_record(record: dict, where: str) -> Any:
    """The model config a checkpoint recorded (`model_record`)."""
    import importlib

    module, _, name = record["type"].partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        what = record["type"]
        raise CheckpointError(f"{where}: its model config class {what} is gone ({e})") from None
    return cls(**record["fields"])


def read_state(path: str) -> dict:
    """The contents of `<path>/state.pt` (a local directory or a URI), loaded without
    running code (weights_only)."""
    import io
    import pickle

    from deqray.data._fs import locate

    file = path.rstrip("/") + "/" + STATE_FILE if "://" in path else os.path.join(path, STATE_FILE)
    loc = locate(file)
    if not loc.exists():
        raise CheckpointError(f"{file}: no such checkpoint file")
    try:
        source = loc.path if "://" not in file else io.BytesIO(loc.read_bytes())
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if "WeightsUnpickler error" in x]
        why = lines[0].split(":", 1)[1].split(". Please use")[0].strip() if lines else str(e)
        raise CheckpointError(
            f"{file}: refused: loading it would run code or build objects that a deqray "
            f"checkpoint never holds (torch.load with weights_only=True: {why})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable checkpoint ({e})") from None


def load_state(path: str, *, model: nn.Module, optimizer, scheduler, rank: int, device):
    """Restore from the checkpoint directory `path`; returns (Progress, this rank's extras)."""
    blob = read_state(path)
    unwrap(model).load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    progress = Progress(**blob["progress"])
    per_rank = blob["per_rank"]
    if rank >= len(per_rank):
        raise CheckpointError(
            f"checkpoint {path} was written by {len(per_rank)} workers; rank {rank} has no state "
            "in it (resume with the same number of workers)"
        )
    mine = dict(per_rank[rank])
    mine["state"] = to_device(mine.get("state"), device)
    return progress, mine
