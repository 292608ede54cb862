"""What a run prints: rank 0's progress line, and the summary at the end."""

from __future__ import annotations

import sys
from typing import Any


def say(line: str) -> None:
    # Ray Train patches print() into a logger that also echoes it: one write, one line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _show(name: str) -> str:
    return name.replace("val_", "val ").replace("_", " ")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"


def progress_line(
    *,
    step: int,
    total: int,
    pretrain: bool,
    loss: float,
    metrics: dict[str, float],
    primary: str,
    last_eval: dict[str, Any],
    rate: float,
    unit: str,
) -> str:
    """`[deqray] step 40/240 deq | loss 4.1 | val ppl 31.2 | fwd 12.0 steps, ... | 21,000 tok/s`."""
    metric = ""
    value = last_eval.get(primary)
    if isinstance(value, (int, float)):
        metric = f" | {_show(primary)} {_fmt(value)}"
    solver = f"fwd {metrics['fwd_nstep']:.1f} steps, rel {metrics['fwd_rel_residual']:.1e}"
    if "bwd_nstep" in metrics:
        solver += f", bwd {metrics['bwd_nstep']:.1f}"
    return (
        f"[deqray] step {step}/{total} {'pretrain' if pretrain else 'deq'} | "
        f"loss {loss:.4f}{metric} | {solver} | {rate:,.0f} {unit}/s"
    )


_SOLVER_LINES = [
    ("val_loss", "val loss", ".4f"),
    ("train_loss", "train loss", ".4f"),
    ("fwd_nstep", "forward steps", ".1f"),
    ("fwd_converged", "forward converged", ".3f"),
    ("bwd_nstep", "backward steps", ".1f"),
    ("items_per_s", "throughput /s", ",.0f"),
]


def summary(end: dict, metrics: dict, task_keys: list[str], run_uri: str, checkpoint) -> str:
    """The run's end: status, the task's metrics (primary first), the solver, where it is."""
    lines = [f"[deqray] run {run_uri}: {end.get('status', 'unknown')} at step {end.get('step')}"]
    if end.get("reason"):
        lines.append(f"  reason: {end['reason']}")
    shown = set()
    for key in task_keys:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and key != "val_loss":
            lines.append(f"  {_show(key):<18} {_fmt(float(v))}")
            shown.add(key)
    for key, label, fmt in _SOLVER_LINES:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and key not in shown:
            lines.append(f"  {label:<18} {v:{fmt}}")
    if checkpoint is not None:
        lines.append(f"  checkpoint         {checkpoint.path}")
    lines.append(f"  tensorboard --logdir {run_uri}/tensorboard")
    return "\n".join(lines)
