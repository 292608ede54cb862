"""Gradients through an equilibrium z* = f(z*, x).

* `attach_implicit` -- implicit function theorem. The gradient v arriving at
  z* becomes u with u = J^T u + v (J = df/dz at z*), solved by a backward
  solver; autograd then carries u through one application of f to the
  parameters and to x. Memory is that of a single f, whatever the depth.
* `phantom` -- k damped steps z <- (1 - a) z + a f(z) from z*, differentiated
  by autograd. Cheaper than a full backward solve; approaches the implicit
  gradient as k grows.
* `unrolled` -- backprop through every forward iteration (`fixed_point` run
  with autograd on): exact for what was computed, memory grows with depth.

All three keep their state in closures and per-call objects, never on a
module, so two forwards in flight (re-entrancy, DDP buckets, activation
checkpointing) cannot clobber each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .solvers import SolverResult, fixed_point, get_solver, no_autocast

GRAD_MODES = ("implicit", "phantom", "unrolled")


@dataclass
class BackwardStats:
    """Filled in by the implicit backward; readable after `loss.backward()`."""

    calls: int = 0
    result: SolverResult | None = None  # the last backward solve

    @property
    def done(self) -> bool:
        return self.result is not None

    def summary(self) -> dict[str, float]:
        if self.result is None:
            return {}
        return {f"bwd_{k}": v for k, v in self.result.summary().items()}


def attach_implicit(
    fz: Tensor,
    z: Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 30,
    tol: float = 1e-5,
    stop_mode: str = "rel",
    solver_options: dict | None = None,
    stats: BackwardStats | None = None,
) -> Tensor:
    """Return `fz` with its incoming gradient replaced by the implicit one.

    `fz` must be f(z) computed with autograd on from `z`, a tensor that
    requires grad and holds the equilibrium (detached from the solver). The
    linear system u = J^T u + v is solved per sample by `solver` (any
    registered name) within `max_iter` steps to `tol`.
    """
    if not z.requires_grad:
        raise ValueError("attach_implicit: z must require grad (use z.detach().requires_grad_())")
    if not fz.requires_grad:
        return fz  # nothing upstream needs a gradient
    solve = get_solver(solver)
    options = dict(solver_options or {})
    stats = stats if stats is not None else BackwardStats()

    def hook(v: Tensor) -> Tensor:
        def step(u: Tensor) -> Tensor:
            (jtu,) = torch.autograd.grad(fz, z, u, retain_graph=True)
            return jtu + v

        with no_autocast():  # backward() may be called inside an autocast region
            res = solve(step, v, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **options)
        stats.calls += 1
        stats.result = res
        return res.flat

    out = fz.view_as(fz)  # a fresh node, so the hook belongs to this call only
    out.register_hook(hook)
    out.backward_stats = stats  # type: ignore[attr-defined]
    return out


def phantom(
    f: Callable[[Tensor], Tensor], z_star: Tensor, *, steps: int = 5, damping: float = 0.5
) -> Tensor:
    """k damped unrolled steps from z* (treated as a constant), with autograd on."""
    if steps < 1:
        raise ValueError(f"phantom: steps must be >= 1, got {steps}")
    if not 0 < damping <= 1:
        raise ValueError(f"phantom: damping must be in (0, 1], got {damping}")
    z = z_star.detach()
    for _ in range(steps):
        fz = f(z)
        z = fz if damping == 1 else torch.lerp(z, fz, damping)
    return z


def unrolled(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str = "rel",
    beta: float = 1.0,
    snapshots=None,
) -> SolverResult:
    """Plain Picard iteration with autograd recording every step (test oracle, pretraining)."""
    return fixed_point(
        f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, beta=beta, snapshots=snapshots
    )
