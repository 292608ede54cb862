"""Fixed-point solvers: find z with z = f(z), per sample.

Every solver has the signature

    solver(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", **options) -> SolverResult

and works on states that are tensors (batch first) or lists of tensors. Three
rules set them apart from the reference DEQ solvers:

* Convergence is judged per sample. The returned iterate of each sample is the
  one with the lowest residual that sample ever had, so a sample that converged
  early is never made worse by the iterations that the others still need.
* Failure is data. Non-finite values of f, singular Anderson systems and
  divergence never raise: the sample is restarted from its best iterate (its
  history cleared) and the result says what happened.
* No host synchronisation per iteration on CUDA. The stopping test for step k
  is read back (through pinned memory) while step k+1 already runs, so the GPU
  is never left idle; the price is at most one extra evaluation of f. On the
  CPU a read-back is free and the test is immediate.

Residuals: abs = ||f(z) - z||, rel = abs / (||f(z)|| + 1e-9), 2-norms per sample.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._errors import reject_unknown, suggest
from ._state import State, StateSpec, flat_function

_EPS = 1e-9
STOP_MODES = ("abs", "rel")


@dataclass
class SolverResult:
    """What a solve produced, per sample.

    Mapping-style access (`res["result"]`, `res["nstep"]`, ...) gives the keys
    of the reference DEQ solvers; everything is also an attribute.
    """

    result: State  # the returned iterate of each sample, shaped like z0
    nstep: Tensor  # (B,) 1-based step at which the returned iterate was evaluated
    lowest: Tensor  # (B,) lowest residual in `stop_mode` (the returned iterate's)
    abs_residual: Tensor  # (B,) absolute residual of the returned iterate
    rel_residual: Tensor  # (B,) relative residual of the returned iterate
    converged: Tensor  # (B,) bool: lowest <= tol
    nonfinite: Tensor  # (B,) bool: f gave non-finite values for this sample at some step
    abs_trace: Tensor  # (n_iter, B) absolute residual at every step
    rel_trace: Tensor  # (n_iter, B) relative residual at every step
    nfe: int  # evaluations of f (each on the whole batch)
    n_iter: int  # steps taken
    solver: str
    stop_mode: str
    tol: float
    flat: Tensor = field(repr=False)  # `result` as the (B, D) matrix solvers work on

    _KEYS = (
        "result",
        "nstep",
        "lowest",
        "abs_residual",
        "rel_residual",
        "converged",
        "nonfinite",
        "abs_trace",
        "rel_trace",
        "nfe",
        "n_iter",
    )

    def __getitem__(self, key: str):
        if key not in self._KEYS:
            raise KeyError(f"{key!r}{suggest(key, self._KEYS)}; keys: {', '.join(self._KEYS)}")
        return getattr(self, key)

    def keys(self):
        return self._KEYS

    @property
    def converged_fraction(self) -> float:
        return float(self.converged.float().mean())

    @property
    def steps_to_tol(self) -> Tensor:
        """(B,) first step at which each sample met the tolerance; n_iter + 1 where it never did."""
        trace = self.rel_trace if self.stop_mode == "rel" else self.abs_trace
        hit = torch.nan_to_num(trace, nan=math.inf) <= self.tol
        first = torch.where(hit.any(0), hit.float().argmax(0) + 1, self.n_iter + 1)
        return first

    def summary(self) -> dict[str, float]:
        """Batch-level figures for logging (one host read-back)."""
        r = self.rel_residual.detach().float()
        a = self.abs_residual.detach().float()
        return {
            "nstep_mean": float(self.nstep.float().mean()),
            "nstep_max": float(self.nstep.max()),
            "rel_residual_mean": float(r.mean()),
            "rel_residual_max": float(r.max()),
            "abs_residual_mean": float(a.mean()),
            "abs_residual_max": float(a.max()),
            "converged_fraction": self.converged_fraction,
            "nonfinite_fraction": float(self.nonfinite.float().mean()),
            "nfe": float(self.nfe),
        }


class _StopFlag:
    """'Has every sample converged?', answered without stalling the GPU.

    On CUDA the flag of step k is copied to pinned host memory without
    blocking; the loop then reads the flag of step k-1, whose copy is done by
    the time step k is queued. On the CPU the flag is read at once.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.zeros(2, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event(), torch.cuda.Event()]

    def __call__(self, k: int, flag: Tensor) -> bool:
        if not self.cuda:
            return bool(flag)
        i = k % 2
        self.host[i].copy_(flag, non_blocking=True)
        self.events[i].record()
        if k == 0:
            return False
        self.events[1 - i].synchronize()
        return bool(self.host[1 - i])


class _Progress:
    """Per-sample residuals, best iterate and stopping test shared by all solvers."""

    def __init__(self, z0: Tensor, tol: float, stop_mode: str):
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.lazy = z0.device.type != "cuda"  # host read-backs are free: branch on them
        self.best_z = z0
        self.best = torch.full((z0.shape[0],), math.inf, dtype=z0.dtype, device=z0.device)
        self.abs_hist: list[Tensor] = []
        self.rel_hist: list[Tensor] = []
        self.stop_flag = _StopFlag(z0.device)
        self.k = 0
        self.stop = False
        self.prev_bad: Tensor | None = None

    def observe(self, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Record step k's residuals and decide whether to stop (see `done`).

        Returns g = f(z) - z; `bad`, the (B,) mask of samples whose residual is
        non-finite now; and `reset`, the samples whose solver history must be
        cleared (bad now, or bad one step ago: the secant pair between a
        non-finite point and the restart point means nothing). On the CPU
        either mask is None when it would be all False; on CUDA they are
        always tensors (branch-free).
        """
        g = fz - z
        a = torch.linalg.vector_norm(g.detach(), dim=1)
        r = a / torch.linalg.vector_norm(fz.detach(), dim=1).add_(_EPS)
        self.abs_hist.append(a)
        self.rel_hist.append(r)
        m = r if self.rel else a
        improved = m < self.best  # False where m is NaN
        self.best = torch.fmin(self.best, m)
        bad = None
        if self.lazy:
            # One read-back answers both questions: amax propagates NaN.
            worst_now, worst_best = torch.stack((m.amax(), self.best.amax())).tolist()
            if math.isfinite(worst_now):
                # every z is finite here, so the blend cannot pick up a NaN
                self.best_z = torch.lerp(self.best_z, z, improved.to(z.dtype).unsqueeze(1))
            else:
                bad = ~torch.isfinite(m)
                self.best_z = torch.where(improved.unsqueeze(1), z, self.best_z)
            self.stop = worst_best <= self.tol
        else:
            bad = ~torch.isfinite(m)
            self.best_z = torch.where(improved.unsqueeze(1), z, self.best_z)
            self.stop = self.stop_flag(self.k, (self.best <= self.tol).all())
        self.k += 1
        prev, self.prev_bad = self.prev_bad, bad
        reset = bad if prev is None else (prev if bad is None else bad | prev)
        return g, bad, reset

    def done(self) -> bool:
        """Whether every sample has met the tolerance (on CUDA: as of one step ago)."""
        return self.stop

    def restart(self, z_next: Tensor, bad: Tensor | None) -> Tensor:
        """Samples whose residual was non-finite continue from their best iterate."""
        if bad is None:
            return z_next
        return torch.where(bad.unsqueeze(1), self.best_z, z_next)

    def finish(self, spec: StateSpec, nfe: int, solver: str, stop_mode: str) -> SolverResult:
        abs_trace = torch.stack(self.abs_hist)
        rel_trace = torch.stack(self.rel_hist)
        metric = rel_trace if self.rel else abs_trace
        step = torch.nan_to_num(metric, nan=math.inf).argmin(0)  # first lowest, as tracked
        pick = step.unsqueeze(0)
        abs_res = abs_trace.gather(0, pick)[0]
        rel_res = rel_trace.gather(0, pick)[0]
        lowest = rel_res if self.rel else abs_res
        return SolverResult(
            result=spec.unflatten(self.best_z),
            nstep=step + 1,
            lowest=lowest,
            abs_residual=abs_res,
            rel_residual=rel_res,
            converged=lowest <= self.tol,
            nonfinite=~(torch.isfinite(abs_trace) & torch.isfinite(rel_trace)).all(0),
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nfe=nfe,
            n_iter=len(self.abs_hist),
            solver=solver,
            stop_mode=stop_mode,
            tol=self.tol,
            flat=self.best_z,
        )


@contextlib.contextmanager
def no_autocast():
    """Autocast off (CPU and CUDA) for the block: solver arithmetic stays in the state's dtype."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _prepare(name, f, z0, max_iter, tol, stop_mode, unknown, valid):
    reject_unknown(f"solver {name!r}", unknown, valid)
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    spec = StateSpec(z0)
    z = spec.flatten(z0)
    if not z.is_floating_point():
        raise TypeError(f"the state must be floating point, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z0 holds non-finite values; start the solver from a finite state")
    return spec, flat_function(f, spec), z


def _clear_rows(reset: Tensor | None, *buffers: Tensor) -> None:
    """Zero, in place, the solver history of the samples in `reset`."""
    if reset is None:
        return
    for buf in buffers:
        buf.masked_fill_(reset.view(-1, *([1] * (buf.dim() - 1))), 0.0)


# --------------------------------------------------------------------------- solvers


def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    beta: float = 1.0,
    **unknown,
) -> SolverResult:
    """Damped Picard iteration z <- (1 - beta) z + beta f(z).

    Written without in-place updates, so it can also run with autograd on
    (that is how the `unrolled` gradient mode differentiates through it).
    """
    spec, ff, z = _prepare("fixed_point", f, z0, max_iter, tol, stop_mode, unknown, ["beta"])
    prog = _Progress(z, tol, stop_mode)
    nfe = 0
    for _ in range(max_iter):
        fz = ff(z)
        nfe += 1
        g, bad, reset = prog.observe(z, fz)
        if prog.done():
            break
        z_next = fz if beta == 1.0 else z + beta * g
        z = prog.restart(z_next, bad)
    return prog.finish(spec, nfe, "fixed_point", stop_mode)


@torch.no_grad()
def anderson(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    **unknown,
) -> SolverResult:
    """Anderson acceleration (type II, difference form), batched per sample.

    With g_k = f(z_k) - z_k and the last `m` differences dG, dZ of g and z:
        gamma = argmin ||g_k - dG gamma||^2 + lam * sum_i ||dG_i||^2 gamma_i^2
        z_{k+1} = z_k + beta g_k - (dZ + beta dG) gamma
    The regulariser is scaled by each column's own norm (it is the same as
    normalising the columns and using a plain `lam`), so it acts the same
    whatever the residuals' scale; a fixed `lam` on raw columns, as in the
    reference code, turns Anderson into Picard iteration as residuals shrink.
    The Gram matrix is updated one row per step. Runs without autograd (use
    `fixed_point` to differentiate through a solve).
    """
    spec, ff, z = _prepare(
        "anderson", f, z0, max_iter, tol, stop_mode, unknown, ["m", "beta", "lam"]
    )
    if m < 1:
        raise ValueError(f"anderson: history size m must be >= 1, got {m}")
    if lam < 0:
        raise ValueError(f"anderson: lam must be >= 0, got {lam}")
    if not beta > 0:
        raise ValueError(f"anderson: beta must be > 0, got {beta}")
    B, D = z.shape
    dG = z.new_zeros(B, m, D)  # differences of g
    dX = z.new_zeros(B, m, D)  # matching differences of z + beta g
    H = z.new_zeros(B, m, m)  # dG dG^T (+ lam on the diagonal, scaled)
    tiny = torch.finfo(z.dtype).tiny ** 0.5  # keeps an all-zero column solvable
    prog = _Progress(z, tol, stop_mode)

    fz = ff(z)
    nfe = 1
    g, bad, reset = prog.observe(z, fz)
    if not prog.done() and max_iter > 1:
        y = fz if beta == 1.0 else torch.add(z, g, alpha=beta)  # z + beta g
        g_prev, y_prev = g, y
        z = prog.restart(y, bad)
        for k in range(1, max_iter):
            fz = ff(z)
            nfe += 1
            g, bad, reset = prog.observe(z, fz)
            if prog.done():
                break
            s = (k - 1) % m
            n = min(k, m)
            y = fz if beta == 1.0 else torch.add(z, g, alpha=beta)
            torch.sub(g, g_prev, out=dG[:, s])
            torch.sub(y, y_prev, out=dX[:, s])
            _clear_rows(reset, dG, dX, H)
            Gn = dG[:, :n]
            # the new Gram row and the right-hand side in one product
            row, rhs = torch.matmul(torch.stack((dG[:, s], g), 1), Gn.transpose(1, 2)).unbind(1)
            # diagonal: (1 + lam)|dg|^2 + lam |dx|^2 + tiny. The |dx| term keeps a
            # column whose dg is rounding noise (J ~ I along dz) from being
            # blown up into a huge step.
            dx2 = torch.linalg.vector_norm(dX[:, s], dim=1).square_().mul_(lam).add_(tiny)
            row[:, s].mul_(1.0 + lam).add_(dx2)
            H[:, s, :n] = row
            H[:, :n, s] = row
            # A failed solve (lam = 0 with dependent columns, NaN) gives non-finite
            # entries, zeroed here: gamma = 0 is a plain damped Picard step. The
            # (B, n, 1) right-hand side makes LAPACK return a row-contiguous gamma,
            # which keeps baddbmm on its fast batched path.
            gamma = torch.linalg.solve_ex(H[:, :n, :n], rhs.unsqueeze(2))[0]
            gamma = torch.nan_to_num(gamma.transpose(1, 2), nan=0.0, posinf=0.0, neginf=0.0)
            g_prev, y_prev = g, y
            z_next = torch.baddbmm(y.unsqueeze(1), gamma, dX[:, :n], alpha=-1).squeeze(1)
            z = prog.restart(z_next, bad)
    return prog.finish(spec, nfe, "anderson", stop_mode)


def _compress(U: Tensor, V: Tensor, n: int, keep: int) -> None:
    """Replace the n pairs of B + I = sum u_i v_i^T by its best rank-`keep` approximation.

    Broyden rank reduction: with U^T = Qu Ru and V^T = Qv Rv (thin QR),
    U^T V = Qu (Ru Rv^T) Qv^T, and the SVD of the small n x n middle factor
    gives the dominant directions. In place; columns past `keep` are zeroed.
    """
    Ut = torch.nan_to_num(U[:, :n]).transpose(1, 2)  # (B, D, n)
    Vt = torch.nan_to_num(V[:, :n]).transpose(1, 2)
    Qu, Ru = torch.linalg.qr(Ut)
    Qv, Rv = torch.linalg.qr(Vt)
    P, S, Wh = torch.linalg.svd(Ru @ Rv.transpose(1, 2))
    k = min(keep, S.shape[1])  # the rank cannot exceed the state size
    U[:, :k] = (Qu @ (P[:, :, :k] * S[:, None, :k])).transpose(1, 2)
    V[:, :k] = (Qv @ Wh[:, :k].transpose(1, 2)).transpose(1, 2)
    U[:, k:n] = 0.0
    V[:, k:n] = 0.0


@torch.no_grad()
def broyden(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    memory: int = 40,
    memory_policy: str = "compress",
    **unknown,
) -> SolverResult:
    """Limited-memory "good" Broyden method on g(z) = f(z) - z = 0, per sample.

    The inverse Jacobian estimate is B = -I + sum_i u_i v_i^T with at most
    `memory` pairs, so memory stays O(memory * D) per sample whatever
    `max_iter` is. When the memory fills:
      * "compress" (default): the update is reduced to its best rank
        memory/2 approximation (Broyden rank reduction, van de Rotten and
        Verduyn Lunel 2003). It keeps the directions that matter -- dropping
        the oldest pairs instead breaks the secant conditions of all later
        ones and stalls the method -- at the price of two thin QRs and a
        small SVD, worth it when f is expensive.
      * "restart": the memory is cleared; free, but more steps afterwards.
    The default memory of 40 covers the usual thresholds (30-35 steps)
    without either. Full steps, no line search: a sample keeps its best
    iterate, and restarts from it if f turns non-finite. Runs without autograd.
    """
    spec, ff, z = _prepare(
        "broyden", f, z0, max_iter, tol, stop_mode, unknown, ["memory", "memory_policy"]
    )
    if memory < 1:
        raise ValueError(f"broyden: memory must be >= 1, got {memory}")
    if memory_policy not in ("compress", "restart"):
        raise ValueError(
            f"broyden: memory_policy must be 'compress' or 'restart', got {memory_policy!r}"
        )
    B, D = z.shape
    mem = max(1, min(memory, max_iter - 1))
    keep = mem // 2 if memory_policy == "compress" else 0
    U = z.new_zeros(B, mem, D)
    V = z.new_zeros(B, mem, D)
    count = 0  # pairs stored in U[:, :count], V[:, :count]
    prog = _Progress(z, tol, stop_mode)

    fz = ff(z)
    nfe = 1
    g, bad, reset = prog.observe(z, fz)
    if not prog.done() and max_iter > 1:
        q = -g  # B_0 g_0 with B_0 = -I; the step was -q
        z_prev, g_prev = z, g
        z = prog.restart(z + g, bad)
        for _ in range(1, max_iter):
            fz = ff(z)
            nfe += 1
            g, bad, reset = prog.observe(z, fz)
            if prog.done():
                break
            _clear_rows(reset, U, V)
            dz = z - z_prev
            dg = g - g_prev
            if count:
                Un, Vn = U[:, :count], V[:, :count]
                cg = torch.linalg.vecdot(Vn, g.unsqueeze(1))  # V g
                w = torch.baddbmm(-g.unsqueeze(1), cg.unsqueeze(1), Un).squeeze(1)  # B g
                cd = torch.linalg.vecdot(Un, dz.unsqueeze(1))  # U dz
                vt = torch.baddbmm(-dz.unsqueeze(1), cd.unsqueeze(1), Vn).squeeze(1)  # B^T dz
            else:
                w, vt = -g, -dz
            den = torch.linalg.vecdot(vt, dg)
            ok = den.abs() > torch.finfo(z.dtype).tiny ** 0.5
            inv = torch.where(ok, den.reciprocal(), 0.0).unsqueeze(1)
            u = (dz - w + q) * inv  # (dz - B dg) / (v^T dg), with B g_prev = q
            if reset is not None:  # no secant update across a restart
                u = u.masked_fill(reset.unsqueeze(1), 0.0)
                vt = vt.masked_fill(reset.unsqueeze(1), 0.0)
            U[:, count] = u
            V[:, count] = vt
            count += 1
            if count < mem:
                Bg = torch.addcmul(w, u, torch.linalg.vecdot(vt, g).unsqueeze(1))
            else:
                if keep:
                    _compress(U, V, count, keep)
                else:
                    U.zero_()
                    V.zero_()
                count = keep
                cg = torch.linalg.vecdot(V[:, :count], g.unsqueeze(1))
                Bg = torch.baddbmm(-g.unsqueeze(1), cg.unsqueeze(1), U[:, :count]).squeeze(1)
            q = Bg
            z_prev, g_prev = z, g
            z = prog.restart(z - Bg, bad)
    return prog.finish(spec, nfe, "broyden", stop_mode)


# --------------------------------------------------------------------------- registry

_SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "anderson": anderson,
    "broyden": broyden,
    "fixed_point": fixed_point,
}


def register_solver(name: str, solver: Callable[..., SolverResult], *, replace: bool = False):
    """Make `solver` available to `get_solver(name)` and to DEQ configs."""
    if name in _SOLVERS and not replace:
        raise ValueError(f"a solver named {name!r} is already registered (pass replace=True)")
    params = inspect.signature(solver).parameters
    for needed in ("max_iter", "tol", "stop_mode"):
        if needed not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"solver {name!r} must accept the keyword {needed!r}")
    _SOLVERS[name] = solver
    return solver


def get_solver(name: str) -> Callable[..., SolverResult]:
    try:
        return _SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown solver {name!r}{suggest(str(name), _SOLVERS)}; "
            f"valid solvers: {', '.join(sorted(_SOLVERS))}"
        ) from None


def available_solvers() -> list[str]:
    return sorted(_SOLVERS)
