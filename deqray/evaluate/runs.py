"""A finished (or running) training run as files: its checkpoints, and the model in one of them.

    model, config = deqray.load("runs/markov-tiny-20261201-101500-ab12")   # latest checkpoint
    model, config = deqray.load(run, checkpoint="best", device="cuda")

A run is the directory (or URI) that `deqray train` or a trial of `deqray
tune` (`<experiment>/runs/<trial name>`) wrote: `metrics.jsonl`,
`status.json`, Ray Train's `checkpoint_*` directories and its
`checkpoint_manager_snapshot.json` (each checkpoint with the report it came
with). "best" is the checkpoint whose report has the task's primary metric
at its best. The checkpoint records the experiment config and the model
config (with the data's sizes), so a model is rebuilt without the data, on
any machine, and loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from deqray.config import ConfigError, Experiment
from deqray.data._fs import locate

SNAPSHOT = "checkpoint_manager_snapshot.json"


class EvaluateError(ConfigError):
    """A run, checkpoint or request that cannot be evaluated; the message names it."""


@dataclass
class Checkpoint:
    uri: str
    metrics: dict = field(default_factory=dict)  # the report it was saved with (may be empty)

    @property
    def step(self) -> int | None:
        v = self.metrics.get("step")
        return int(v) if isinstance(v, (int, float)) else None


def run_uri(run: str | os.PathLike) -> str:
    text = os.fspath(run)
    return text.rstrip("/") if "://" in text else os.path.abspath(os.path.expanduser(text))


def checkpoints(run: str) -> list[Checkpoint]:
    """The run's checkpoints, oldest first (empty when it has none yet).

    EvaluateError when `run` is not a run directory at all."""
    uri = run_uri(run)
    loc = locate(uri)
    if not loc.is_dir():
        raise EvaluateError(f"{uri}: no such run directory")
    names = loc.list()
    marks = ("metrics.jsonl", "status.json", SNAPSHOT)
    if not any(n in names for n in marks) and not any(n.startswith("checkpoint_") for n in names):
        raise EvaluateError(
            f"{uri}: not a deqray run (no metrics.jsonl, status.json or checkpoint_* in it); "
            "pass the run directory that deqray train printed, or <experiment>/runs/<trial name> "
            "for a trial of a study"
        )
    snapshot = loc.join(SNAPSHOT)
    recorded: dict[str, dict] = {}
    if snapshot.exists():
        for entry in json.loads(snapshot.read_bytes()).get("checkpoint_results", []):
            recorded[entry["checkpoint_dir_name"]] = entry.get("metrics") or {}
    dirs = sorted(n for n in names if n.startswith("checkpoint_") and n != SNAPSHOT)
    return [Checkpoint(f"{uri}/{n}", recorded.get(n, {})) for n in dirs]


def pick(run: str, which: str = "latest", primary: Any = None) -> Checkpoint:
    """`which`: "latest", "best" (by `primary`, a report key and direction), or a path."""
    if which not in ("latest", "best"):
        loc = locate(run_uri(which))
        if not loc.join("state.pt").exists():
            raise EvaluateError(f"--checkpoint {which}: no state.pt there (not a checkpoint)")
        return Checkpoint(run_uri(which))
    found = checkpoints(run)
    if not found:
        raise EvaluateError(
            f"{run_uri(run)}: no checkpoint yet (a run writes its first one at its first "
            "evaluation, train.eval_every steps in)"
        )
    if which == "latest":
        return found[-1]
    name, direction = primary
    scored = [c for c in found if _finite(c.metrics.get(name))]
    if not scored:
        raise EvaluateError(
            f"--checkpoint best: no checkpoint of {run_uri(run)} recorded {name} (the task's "
            "primary metric); use --checkpoint latest"
        )
    sign = 1.0 if direction == "min" else -1.0
    return min(scored, key=lambda c: sign * float(c.metrics[name]))


def read_checkpoint(ckpt: Checkpoint) -> tuple[dict, Experiment]:
    """(the checkpoint's state, its experiment config)."""
    from deqray.train.state import CheckpointError, read_state

    try:
        state = read_state(ckpt.uri)
    except CheckpointError as e:
        raise EvaluateError(str(e)) from None
    try:
        cfg = Experiment.from_dict(state["config"], f"{ckpt.uri}/state.pt: config")
    except KeyError:
        raise EvaluateError(
            f"{ckpt.uri}/state.pt: no config in it (not a deqray checkpoint)"
        ) from None
    return state, cfg


def build_model(state: dict, cfg: Experiment, where: str, changes: dict | None = None):
    """The trained model (eval mode, on the CPU) from a checkpoint's state; `changes` are
    fields of its model config to set first (e.g. a longer memory to evaluate with)."""
    import dataclasses

    from deqray.tasks import Batching, DataPlan, RunContext
    from deqray.train.state import model_from_record

    record = state.get("model_config")
    if record is None:
        raise EvaluateError(
            f"{where}: the checkpoint has no model config (written before deqray recorded it)"
        )
    model_cfg = model_from_record(record, where)
    if changes:
        try:
            model_cfg = dataclasses.replace(model_cfg, **changes)
        except TypeError as e:
            raise EvaluateError(f"model overrides {sorted(changes)}: {e}") from None
    task = cfg.get_task()
    run = RunContext(
        experiment=cfg,
        task=task,
        plan=DataPlan(model_cfg, cfg.data.train_split, cfg.data.eval_split or "", 1, 1),
        batching=Batching(1, 1, 1),
        total_steps=0,
        pretrain_steps=0,
        run_uri="",
    )
    model = task.build_model(run)
    model.load_state_dict(state["model"])
    return model.eval()


def load(run: str | os.PathLike, checkpoint: str = "latest", device: Any = None):
    """(model, config): a run's trained model in eval mode on `device`, and its experiment.

    `checkpoint`: "latest", "best" (by the task's primary metric) or a checkpoint path.
    """
    ckpt = resolve_checkpoint(run, checkpoint)
    state, cfg = read_checkpoint(ckpt)
    model = build_model(state, cfg, ckpt.uri)
    if device is not None:
        model = model.to(device)
    return model, cfg


def resolve_checkpoint(run: str | os.PathLike, checkpoint: str = "latest") -> Checkpoint:
    """The checkpoint `checkpoint` names in `run`; "best" reads the task's primary metric
    from the latest checkpoint's config."""
    uri = run_uri(run)
    if checkpoint != "best":
        return pick(uri, checkpoint)
    _, cfg = read_checkpoint(pick(uri, "latest"))
    from deqray.train.report import task_metrics

    primary = task_metrics(cfg)[0]
    return pick(uri, "best", (primary.name, primary.direction))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
