"""What a training report carries: the task's evaluation metrics and the platform's own.

Every report (one per evaluation) holds the task's metrics as `val_<name>`
(`Task.metrics`), the solver's statistics of the evaluation as `val_fwd_*`,
and the platform's keys below: the training interval's loss, solver and
throughput figures, and where the run is. `report_metrics(exp)` lists them
all, which is what a study's objectives are checked against.
"""

from __future__ import annotations

from deqray.config import Experiment
from deqray.tasks import Metric

_FWD = [
    Metric("fwd_nstep", "min", "forward solver steps, mean over samples"),
    Metric("fwd_nstep_max", "min", "forward solver steps, worst sample"),
    Metric("fwd_abs_residual", "min", "forward absolute residual, mean"),
    Metric("fwd_rel_residual", "min", "forward relative residual, mean"),
    Metric("fwd_rel_residual_max", "min", "forward relative residual, worst sample"),
    Metric("fwd_converged", "max", "fraction of samples whose forward solve converged"),
    Metric("fwd_nfe", "min", "forward function evaluations"),
    Metric("fwd_nonfinite", "min", "fraction of samples with a non-finite iterate"),
]
# the training interval's own (means over its steps; `_max` keys the worst)
TRAINING: list[Metric] = [
    Metric("train_loss", "min", "the task's loss on the training batches"),
    *_FWD,
    Metric("bwd_nstep", "min", "backward (implicit gradient) solver steps (DEQ steps only)"),
    Metric("bwd_rel_residual", "min", "backward relative residual, mean"),
    Metric("bwd_rel_residual_max", "min", "backward relative residual, worst sample"),
    Metric("bwd_converged", "max", "fraction of samples whose backward solve converged"),
    Metric("bwd_nfe", "min", "backward function evaluations"),
    Metric("jac_loss", "min", "Jacobian regulariser ||J||_F^2 / dim (steps that computed it)"),
    Metric("grad_norm", None, "gradient norm before clipping"),
    Metric("step_time", "min", "seconds per optimiser step"),
    Metric("items_per_s", "max", "throughput in the task's unit (tokens, images, ...)"),
    Metric("steps", None, "optimiser steps in the interval"),
]
# the solver on the evaluation split (the sradius pair with train.eval_sradius only)
EVALUATION: list[Metric] = [
    *(Metric("val_" + m.name, m.direction, m.doc + " (evaluation)") for m in _FWD),
    Metric("val_sradius", "min", "spectral radius of J_f at the equilibrium, mean"),
    Metric("val_sradius_max", "min", "spectral radius of J_f at the equilibrium, worst"),
]
PROGRESS: list[Metric] = [
    Metric("step", None, "optimiser steps taken"),
    Metric("epoch", None, "epochs of the training split, fractional"),
    Metric("lr", None, "learning rate"),
    Metric("phase", None, "0 in pretraining, 1 in DEQ mode"),
    Metric("jac_loss_weight", None, "weight of the Jacobian term"),
    Metric("time", None, "wall clock (seconds since the epoch)"),
]
TEXT = ("status", "reason")  # strings: running | finished | stopped | diverged, and why


def task_metrics(exp: Experiment) -> list[Metric]:
    """The task's metrics as they appear in reports (`val_` + name), primary first."""
    return [Metric("val_" + m.name, m.direction, m.doc) for m in exp.get_task().metrics(exp)]


def report_metrics(exp: Experiment) -> dict[str, Metric]:
    """Every numeric key a report of `exp` may carry, by name."""
    return {m.name: m for m in [*task_metrics(exp), *TRAINING, *EVALUATION, *PROGRESS]}
