"""One optimiser step of any task: plain PyTorch, the same with or without Ray.

    result = train_step(run, model, optimizer, scheduler, batch, state, step=i, autocast=ac)

The task gives the loss; here come the Jacobian term (its weight and whether
this step draws it are functions of the step, the same on every rank and on
resume), the backward, clipping, the optimiser and the schedule. A
non-finite loss or gradient skips the optimiser step and says why in
`result.diverged`: with DDP, the averaged gradients carry a non-finite value
of any rank to every rank alike, so all of them stop at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deqray.tasks import RunContext

from .state import jac_this_step, jac_weight


@dataclass
class StepResult:
    loss: float  # the task's loss on the batch (without the Jacobian term)
    info: Any  # the solve's DEQInfo
    items: int
    state: Any  # the task's state for this rank's next batch
    grad_norm: float
    seconds: float  # the step's wall time (synchronised on CUDA)
    jac_loss: float | None  # the Jacobian term, on the steps that computed it
    diverged: str | None = None  # why the step was not taken (non-finite loss or gradients)

    def metrics(self) -> dict[str, float]:
        """The step's solver statistics and gradient norm (reads the solve's tensors)."""
        m = self.info.metrics()
        m["grad_norm"] = self.grad_norm
        return m

    def residuals(self) -> dict[str, torch.Tensor]:
        """Per-sample values for the histograms."""
        out = {"fwd_rel_residual": self.info.rel_residual, "fwd_nstep": self.info.nstep}
        if self.info.backward.result is not None:
            out["bwd_rel_residual"] = self.info.backward.result.rel_residual
        return out


def train_step(
    run: RunContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: Any,
    state: Any,
    *,
    step: int,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> StepResult:
    exp = run.experiment
    pretrain = step < run.pretrain_steps
    w = jac_weight(step, run.pretrain_steps, exp)
    want_jac = w > 0 and jac_this_step(step, exp.train.seed, exp.reg.jac_loss_freq)
    t0 = time.perf_counter()
    with autocast():
        out = run.task.loss(model, batch, state, pretrain=pretrain, jac_loss=want_jac)
    total = out.loss.float()
    jac = out.info.jac_loss if want_jac else None
    if jac is not None:
        total = total + w * jac.float()
    if exp.debug.nan_at_step is not None and step >= exp.debug.nan_at_step:
        total = total * float("nan")
    optimizer.zero_grad(set_to_none=True)
    if bool(torch.isfinite(total.detach())):
        total.backward()
    else:
        # No backward through a non-finite loss (the implicit solver refuses a
        # NaN start), but NaN gradients for every parameter: DDP's all-reduce
        # then hands them to every rank alike.
        params = [p for p in model.parameters() if p.requires_grad]
        (sum((p * 0).sum() for p in params) * float("nan")).backward()
    grads = [p for p in model.parameters() if p.grad is not None]
    if exp.optim.clip_grad_norm:
        norm = torch.nn.utils.clip_grad_norm_(grads, exp.optim.clip_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
    loss = float(out.loss.detach())
    diverged = None
    if not bool(torch.isfinite(norm)):
        value = float(total.detach())
        what = (
            f"non-finite loss ({value:g})" if not math.isfinite(value) else "non-finite gradients"
        )
        diverged = f"{what} at step {step}"
    else:
        optimizer.step()
        scheduler.step()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return StepResult(
        loss=loss,
        info=out.info,
        items=int(out.items),
        state=out.state,
        grad_norm=float(norm),
        seconds=time.perf_counter() - t0,
        jac_loss=float(jac.detach()) if jac is not None else None,
        diverged=diverged,
    )
