"""Fixed-point solvers: find z with z = f(z), per sample.

Every solver has the signature

    solver(f, z0, *, max_iter=50, tol=1e-4, stop_mode="rel", snapshots=None, **options)
        -> SolverResult

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

Snapshots: `snapshots=(2, 4, 8)` makes `result.snapshots[k]` the SolverResult
that the same call with `max_iter=k` returns (each sample's best iterate of
the first k steps, its statistics and traces), from this one solve. That holds
because no solver's first k steps depend on `max_iter`: the one place that
looks at it (Broyden's memory size, at most max_iter - 1 pairs) can only
trigger a rank reduction on an iteration whose update is never evaluated, and
that update is skipped (no solver builds the step after its last evaluation).

Cost. A solve should cost its evaluations of f and little else. The
histories are preallocated and written in place, the residual traces are
rows of one preallocated matrix, and on the CPU the per-sample bookkeeping
(a few operations on (batch,) vectors) runs in numpy on views of the same
memory, where an operation costs about a microsecond instead of PyTorch's
three to five. Measured against NFE x (time of f) in
benchmarks/bench_solvers.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._errors import reject_unknown, suggest
from ._state import State, StateSpec, flat_function

_EPS = 1e-9
STOP_MODES = ("abs", "rel")
_HOST_DTYPES = (torch.float16, torch.float32, torch.float64)  # those numpy can view


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
    # {k: what the same solve with max_iter=k returns}, for the requested k
    snapshots: dict[int, SolverResult] = field(default_factory=dict, repr=False)

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
    the time step k is queued. Elsewhere the flag is read at once.
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


def check_snapshots(snapshots: Iterable[int] | None, max_iter: int, where: str) -> tuple[int, ...]:
    """The requested snapshot steps, sorted and unique; a clear error for bad ones."""
    if snapshots is None:
        return ()
    if isinstance(snapshots, (int, str)):
        raise TypeError(f"{where}: snapshots must be a sequence of steps, got {snapshots!r}")
    steps = []
    for k in snapshots:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{where}: snapshot steps must be positive integers, got {k!r}")
        k = int(k)
        if k > max_iter:
            raise ValueError(
                f"{where}: snapshot step {k} is past the iteration budget max_iter={max_iter}"
            )
        steps.append(k)
    return tuple(sorted(set(steps)))


class _Progress:
    """Per-sample residuals, best iterate, stopping test and snapshots shared by all solvers.

    `best_z` is rebound, never written in place, so a snapshot can keep a
    reference to it; the solvers likewise never write into an iterate once
    it has been evaluated.
    """

    def __init__(self, z0: Tensor, tol: float, stop_mode: str, max_iter: int, snapshots=()):
        self.tol = tol
        self.rel = stop_mode == "rel"
        B = z0.shape[0]
        self.best_z = z0
        opts = dict(dtype=z0.dtype, device=z0.device)
        self.abs_trace = torch.empty(max_iter, B, **opts)
        self.rel_trace = torch.empty(max_iter, B, **opts)
        self.abs_rows = self.abs_trace.unbind(0)
        self.rel_rows = self.rel_trace.unbind(0)
        self.fnorm = torch.empty(B, **opts)
        self.best = torch.full((B,), math.inf, **opts)
        # On the CPU the (B,) bookkeeping runs in numpy, on views of the same memory.
        self.host = z0.device.type == "cpu" and z0.dtype in _HOST_DTYPES
        if self.host:
            self.abs_np = self.abs_trace.numpy()
            self.rel_np = self.rel_trace.numpy()
            self.fnorm_np = self.fnorm.numpy()
            self.best_np = self.best.numpy()
        else:
            self.stop_flag = _StopFlag(z0.device)
        self.snap_steps = frozenset(snapshots)
        self.snap_z: dict[int, Tensor] = {}
        self.k = 0
        self.stop = False
        self.prev_bad: Tensor | None = None

    def observe(
        self, z: Tensor, fz: Tensor, g: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Record step k's residuals and decide whether to stop (see `done`).

        `g` = f(z) - z when the caller has it already (written into its own
        buffer). Returns g; `bad`, the (B,) mask of samples whose residual is
        non-finite now; and `reset`, the samples whose solver history must be
        cleared (bad now, or bad one step ago: the secant pair between a
        non-finite point and the restart point means nothing). On the CPU
        either mask is None when it would be all False; on CUDA they are
        always tensors (branch-free).
        """
        if g is None:
            g = fz - z
        k = self.k
        gd = g.detach() if g.requires_grad else g
        fzd = fz.detach() if fz.requires_grad else fz
        a_row, r_row = self.abs_rows[k], self.rel_rows[k]
        torch.linalg.vector_norm(gd, dim=1, out=a_row)
        torch.linalg.vector_norm(fzd, dim=1, out=self.fnorm)
        bad = None
        if self.host:
            a, r = self.abs_np[k], self.rel_np[k]
            np.add(self.fnorm_np, _EPS, out=self.fnorm_np)
            np.divide(a, self.fnorm_np, out=r)
            m = r if self.rel else a
            improved = m < self.best_np  # False where m is NaN
            np.fmin(self.best_np, m, out=self.best_np)
            if improved.all():
                self.best_z = z
            elif not np.isfinite(m.max()):  # max propagates NaN
                bad = torch.from_numpy(~np.isfinite(m))
                self.best_z = torch.where(torch.from_numpy(improved).unsqueeze(1), z, self.best_z)
            elif improved.any():
                # Every z is finite here, so a blend with weights 0 and 1 is exact
                # (and 3-4x cheaper than torch.where with a broadcast mask).
                w = torch.from_numpy(improved.astype(self.best_np.dtype)).unsqueeze(1)
                self.best_z = torch.lerp(self.best_z, z, w)
            self.stop = bool(self.best_np.max() <= self.tol)
        else:
            torch.div(a_row, self.fnorm.add_(_EPS), out=r_row)
            m = r_row if self.rel else a_row
            improved = m < self.best
            torch.fmin(self.best, m, out=self.best)
            bad = ~torch.isfinite(m)
            self.best_z = torch.where(improved.unsqueeze(1), z, self.best_z)
            self.stop = self.stop_flag(k, (self.best <= self.tol).all())
        self.k = k + 1
        if self.k in self.snap_steps:
            self.snap_z[self.k] = self.best_z
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

    def _result(self, n: int, best_z: Tensor, spec: StateSpec, solver: str) -> SolverResult:
        abs_trace = self.abs_trace[:n]
        rel_trace = self.rel_trace[:n]
        metric = rel_trace if self.rel else abs_trace
        step = torch.nan_to_num(metric, nan=math.inf).argmin(0)  # first lowest, as tracked
        pick = step.unsqueeze(0)
        abs_res = abs_trace.gather(0, pick)[0]
        rel_res = rel_trace.gather(0, pick)[0]
        lowest = rel_res if self.rel else abs_res
        return SolverResult(
            result=spec.unflatten(best_z),
            nstep=step + 1,
            lowest=lowest,
            abs_residual=abs_res,
            rel_residual=rel_res,
            converged=lowest <= self.tol,
            nonfinite=~(torch.isfinite(abs_trace) & torch.isfinite(rel_trace)).all(0),
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nfe=n,  # one evaluation of f per step, in every solver here
            n_iter=n,
            solver=solver,
            stop_mode="rel" if self.rel else "abs",
            tol=self.tol,
            flat=best_z,
        )

    def finish(self, spec: StateSpec, solver: str) -> SolverResult:
        n = self.k
        res = self._result(n, self.best_z, spec, solver)
        for k in sorted(self.snap_steps):
            # past the last step, a solve with max_iter=k stops where this one did
            res.snapshots[k] = (
                self._result(k, self.snap_z[k], spec, solver)
                if k < n
                else dataclasses.replace(res, snapshots={})
            )
        return res


@contextlib.contextmanager
def no_autocast():
    """Autocast off (CPU and CUDA) for the block: solver arithmetic stays in the state's dtype."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _prepare(name, f, z0, max_iter, tol, stop_mode, snapshots, unknown, valid):
    reject_unknown(f"solver {name!r}", unknown, valid)
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    snaps = check_snapshots(snapshots, max_iter, f"solver {name!r}")
    spec = StateSpec(z0)
    z = spec.flatten(z0)
    if not z.is_floating_point():
        raise TypeError(f"the state must be floating point, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z0 holds non-finite values; start the solver from a finite state")
    return spec, flat_function(f, spec), z, _Progress(z, tol, stop_mode, max_iter, snaps)


def _clear_rows(reset: Tensor | None, *buffers: Tensor, batch_dim: int = 0) -> None:
    """Zero, in place, the solver history of the samples in `reset`."""
    if reset is None:
        return
    for buf in buffers:
        shape = [1] * buf.dim()
        shape[batch_dim] = -1
        buf.masked_fill_(reset.view(shape), 0.0)


# --------------------------------------------------------------------------- solvers


def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    snapshots: Iterable[int] | None = None,
    beta: float = 1.0,
    **unknown,
) -> SolverResult:
    """Damped Picard iteration z <- (1 - beta) z + beta f(z).

    Written without in-place updates of the iterates, so it can also run with
    autograd on (that is how the `unrolled` gradient mode differentiates
    through it).
    """
    spec, ff, z, prog = _prepare(
        "fixed_point", f, z0, max_iter, tol, stop_mode, snapshots, unknown, ["beta"]
    )
    for k in range(1, max_iter + 1):
        fz = ff(z)
        g, bad, _ = prog.observe(z, fz)
        if prog.done() or k == max_iter:
            break
        z_next = fz if beta == 1.0 else z + beta * g
        z = prog.restart(z_next, bad)
    return prog.finish(spec, "fixed_point")


@torch.no_grad()
def anderson(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    snapshots: Iterable[int] | None = None,
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
    The Gram matrix is updated by the new column only. Runs without autograd
    (use `fixed_point` to differentiate through a solve).
    """
    spec, ff, z, prog = _prepare(
        "anderson", f, z0, max_iter, tol, stop_mode, snapshots, unknown, ["m", "beta", "lam"]
    )
    if m < 1:
        raise ValueError(f"anderson: history size m must be >= 1, got {m}")
    if lam < 0:
        raise ValueError(f"anderson: lam must be >= 0, got {lam}")
    if not beta > 0:
        raise ValueError(f"anderson: beta must be > 0, got {beta}")
    B, D = z.shape
    # Slot-major buffers, so that every slot is one contiguous (B, D) block.
    # G[:m] holds the differences of g, G[m] the current g: the new difference
    # (slot s) and g are then rows s and m of one array, and a strided view of
    # the two gives the Gram row and the right-hand side in one product.
    G = z.new_zeros(m + 1, B, D)
    X = z.new_zeros(m, B, D)  # matching differences of y = z + beta g
    H = z.new_zeros(B, m, m)  # dG dG^T (+ the scaled regulariser on the diagonal)
    hist, g_now = G[:m], G[m]
    pair = [G.as_strided((B, 2, D), (D, (m - s) * B * D, 1), s * B * D) for s in range(m)]
    G_T = [G[:n].permute(1, 2, 0) for n in range(m + 1)]  # (B, D, n)
    X_n = [X[:n].transpose(0, 1) for n in range(m + 1)]  # (B, n, D)
    H_nn = [H[:, :n, :n] for n in range(m + 1)]
    tiny = torch.finfo(z.dtype).tiny ** 0.5  # keeps an all-zero column solvable
    host = prog.host
    H_np = H.numpy() if host else None

    fz = ff(z)
    torch.sub(fz, z, out=g_now)
    _, bad, reset = prog.observe(z, fz, g_now)
    if not prog.done() and max_iter > 1:
        y = fz if beta == 1.0 else torch.add(z, g_now, alpha=beta)  # z + beta g
        y_prev = y
        z = prog.restart(y, bad)
        for k in range(1, max_iter):
            fz = ff(z)
            s = (k - 1) % m
            n = min(k, m)
            # the new difference of g first, while G[m] still holds the previous g
            torch.sub(fz, z, out=G[s]).sub_(g_now)
            torch.sub(fz, z, out=g_now)
            _, bad, reset = prog.observe(z, fz, g_now)
            if prog.done() or k == max_iter - 1:
                break  # the next iterate would never be evaluated
            y = fz if beta == 1.0 else torch.add(z, g_now, alpha=beta)
            torch.sub(y, y_prev, out=X[s])
            _clear_rows(reset, hist, X, batch_dim=1)
            _clear_rows(reset, H)
            # row = dG_s . dG_j (j < n) and rhs = g . dG_j, in one product
            P = torch.bmm(pair[s], G_T[n])
            # diagonal: (1 + lam)|dg|^2 + lam |dx|^2 + tiny. The |dx| term keeps a
            # column whose dg is rounding noise (J ~ I along dz) from being
            # blown up into a huge step.
            dx = torch.linalg.vector_norm(X[s], dim=1)
            if host:
                Pn, dxn = P.numpy(), dx.numpy()
                Pn[:, 0, s] = Pn[:, 0, s] * (1.0 + lam) + (dxn * dxn * lam + tiny)
                H_np[:, s, :n] = Pn[:, 0]
                H_np[:, :n, s] = Pn[:, 0]
            else:
                row = P[:, 0]
                row[:, s].mul_(1.0 + lam).add_(dx.square_().mul_(lam).add_(tiny))
                H[:, s, :n] = row
                H[:, :n, s] = row
            # A failed solve (lam = 0 with dependent columns, NaN) gives non-finite
            # entries, zeroed by _small_solve: gamma = 0 is a plain damped Picard step. The
            # (B, n, 1) right-hand side makes LAPACK return a row-contiguous gamma,
            # which keeps baddbmm on its fast batched path.
            gamma = _small_solve(H_nn[n], P[:, 1:2].transpose(1, 2), host).transpose(1, 2)
            y_prev = y
            z_next = torch.baddbmm(y.unsqueeze(1), gamma, X_n[n], alpha=-1).squeeze(1)
            z = prog.restart(z_next, bad)
    return prog.finish(spec, "anderson")


def _small_solve(H: Tensor, rhs: Tensor, host: bool) -> Tensor:
    """Solve the batch of small systems H x = rhs; non-finite entries of x become 0.

    On the CPU numpy's batched solve goes straight to LAPACK; torch's adds
    checks and copies that cost more than the solve of a 5 x 5 system. A
    singular matrix makes numpy raise, and then torch's solve_ex (which does
    not) answers for the batch.
    """
    if host and H.dtype in (torch.float32, torch.float64):  # (numpy has no float16 LAPACK)
        try:
            x = np.linalg.solve(H.numpy(), rhs.numpy())
        except np.linalg.LinAlgError:
            x = torch.linalg.solve_ex(H, rhs)[0].numpy()
        # A sum is non-finite whenever an entry is, and costs a fifth of nan_to_num's
        # pass; the rare overflow of a finite sum only sends it to the no-op pass.
        if not np.isfinite(np.add.reduce(x, axis=None)):
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.from_numpy(x)
    x = torch.linalg.solve_ex(H, rhs)[0]
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _grow(U: Tensor, V: Tensor, count: int, size: int) -> tuple[Tensor, Tensor]:
    """Broyden's pair buffers with room for `size` pairs, the first `count` kept."""
    B, _, D = U.shape
    U2, V2 = U.new_zeros(B, size, D), V.new_zeros(B, size, D)
    U2[:, :count] = U[:, :count]
    V2[:, :count] = V[:, :count]
    return U2, V2


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
    snapshots: Iterable[int] | None = None,
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
    spec, ff, z, prog = _prepare(
        "broyden",
        f,
        z0,
        max_iter,
        tol,
        stop_mode,
        snapshots,
        unknown,
        ["memory", "memory_policy"],
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
    # The buffers grow with the pairs actually stored (doubling, up to `mem`):
    # a solve that stops after 15 steps does not zero and page in 40 columns.
    U = V = z.new_zeros(B, 0, D)
    thresh = torch.finfo(z.dtype).tiny ** 0.5
    count = 0  # pairs stored in U[:, :count], V[:, :count]

    fz = ff(z)
    g, bad, reset = prog.observe(z, fz)
    if not prog.done() and max_iter > 1:
        q = -g  # B_0 g_0 with B_0 = -I; the step was -q
        z_prev, g_prev = z, g
        z = prog.restart(z + g, bad)
        for k in range(1, max_iter):
            fz = ff(z)
            g, bad, reset = prog.observe(z, fz)
            if prog.done() or k == max_iter - 1:
                break  # the next iterate would never be evaluated
            if count == U.shape[1]:
                U, V = _grow(U, V, count, min(mem, max(8, 2 * count)))
            _clear_rows(reset, U, V)
            dz = z - z_prev
            dg = g - g_prev
            g1, dz1, vt = g.unsqueeze(1), dz.unsqueeze(1), V[:, count].unsqueeze(1)
            if count:
                Un, Vn = U[:, :count], V[:, :count]
                cg = torch.bmm(g1, Vn.transpose(1, 2))  # (V g)^T
                w = torch.baddbmm(g1, cg, Un, beta=-1).squeeze(1)  # B g
                cd = torch.bmm(dz1, Un.transpose(1, 2))  # (U dz)^T
                torch.baddbmm(dz1, cd, Vn, beta=-1, out=vt)  # B^T dz, written into V
            else:
                w = torch.neg(g)
                torch.neg(dz1, out=vt)
            vt = vt.squeeze(1)
            den = torch.linalg.vecdot(vt, dg)
            ok = den.abs() > thresh
            inv = torch.where(ok, den.reciprocal(), 0.0).unsqueeze(1)
            u = U[:, count]
            torch.sub(dz, w, out=u).add_(q).mul_(inv)  # (dz - B dg) / (v^T dg), B g_prev = q
            if reset is not None:  # no secant update across a restart
                u.masked_fill_(reset.unsqueeze(1), 0.0)
                vt.masked_fill_(reset.unsqueeze(1), 0.0)
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
                cg = torch.bmm(g1, V[:, :count].transpose(1, 2))
                Bg = torch.baddbmm(g1, cg, U[:, :count], beta=-1).squeeze(1)
            q = Bg
            z_prev, g_prev = z, g
            z = prog.restart(z - Bg, bad)
    return prog.finish(spec, "broyden")


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
