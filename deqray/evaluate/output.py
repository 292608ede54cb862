"""An evaluation on the terminal, as JSON, and as a plot of quality against forward steps."""

from __future__ import annotations

import json
import math

from .split import Evaluation

SOLVER = ("fwd_nstep", "fwd_nstep_max", "fwd_rel_residual", "fwd_rel_residual_max",
          "fwd_converged", "sradius", "sradius_max")  # fmt: skip


def table(ev: Evaluation) -> str:
    """One row per budget: the task's metrics, then the solver's (mean and worst sample)."""
    p = f"{ev.split}_"
    keys = sorted(
        {k for pt in ev.points for k in pt.metrics if not _is_solver(k[len(p) :])},
        key=lambda k: (k != ev.primary, k),
    )
    keys = [k for k in keys if not k[len(p) :].startswith("iou_")]  # per class: in the JSON
    keys += [p + s for s in SOLVER if any(p + s in pt.metrics for pt in ev.points)]
    cols = ["f_thres", *(k[len(p) :] for k in keys), "seconds"]
    rows = [
        [str(pt.f_thres or "run's"), *(_cell(pt.metrics.get(k)) for k in keys), f"{pt.seconds:.1f}"]
        for pt in ev.points
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    head = (
        f"[deqray] {ev.task} run {ev.run}, checkpoint at step {ev.step}, split {ev.split!r} "
        f"({ev.points[0].batches} batches):"
    )
    lines = [head, "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    for r in rows:
        lines.append("  " + "  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def to_json(ev: Evaluation) -> bytes:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(ev.to_dict()), indent=1).encode()


def plot(ev: Evaluation) -> bytes:
    """PNG: the primary metric against the forward steps taken, one point per budget."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_key = f"{ev.split}_fwd_nstep"
    pts = [pt for pt in ev.points if ev.primary in pt.metrics and steps_key in pt.metrics]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    xs, ys = [pt.metrics[steps_key] for pt in pts], [pt.metrics[ev.primary] for pt in pts]
    ax.plot(xs, ys, "o-", color="tab:red")
    for pt, x, y in zip(pts, xs, ys, strict=True):
        ax.annotate(f"f_thres {pt.f_thres}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("forward solver steps (mean per sample)")
    ax.set_ylabel(f"{ev.primary} ({'lower' if ev.direction == 'min' else 'higher'} is better)")
    ax.set_title(f"{ev.task}: quality against equilibrium compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _is_solver(name: str) -> bool:
    return name.startswith(("fwd_", "bwd_", "sradius"))


def _cell(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
