"""Snapshots: the iterates of one solve at requested steps, each equal to a separate solve
with that step as its budget (per-sample best iterate, per-sample statistics)."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from deqray.core import DEQ, get_solver

from . import helpers
from .helpers import MultiScale, contractive

hard = functools.lru_cache(helpers.hard)  # calibrated once per shape, not once per test

SOLVERS = {
    "anderson": {},
    "anderson-m2": dict(m=2),
    "broyden": {},
    # memory 4: the rank reduction runs inside the solve (count reaches 4 at
    # iteration 4), and the budgets 5 and 6 sit on both sides of it
    "broyden-mem4": dict(memory=4),
    "broyden-restart": dict(memory=3, memory_policy="restart"),
    "fixed_point": {},
    "fixed_point-damped": dict(beta=0.6),
}
STEPS = (1, 2, 3, 4, 5, 6, 8, 13, 20)


def assert_same_result(a, b, what):
    """Two SolverResults are the same solve: states, statistics and traces."""
    fa = a.flat
    fb = b.flat
    torch.testing.assert_close(fa, fb, rtol=1e-12, atol=1e-14, msg=f"{what}: state")
    if isinstance(b.result, list):
        assert [t.shape for t in a.result] == [t.shape for t in b.result]
    for key in ("nstep", "converged", "nonfinite"):
        assert torch.equal(getattr(a, key), getattr(b, key)), f"{what}: {key}"
    for key in ("lowest", "abs_residual", "rel_residual", "abs_trace", "rel_trace"):
        torch.testing.assert_close(
            getattr(a, key),
            getattr(b, key),
            rtol=1e-12,
            atol=1e-14,
            equal_nan=True,
            msg=f"{what}: {key}",
        )
    assert (a.nfe, a.n_iter, a.solver, a.stop_mode, a.tol) == (
        b.nfe,
        b.n_iter,
        b.solver,
        b.stop_mode,
        b.tol,
    ), what


def slow_sample_problem():
    """Sample 0 is exact at step 2 (f is constant for it), the others take far longer."""
    layer, x = hard(batch=4, width=16)

    def f(z):
        out = layer(z, x)
        return torch.cat([0.0 * out[:1] + 0.3, out[1:]])

    return f, torch.zeros_like(x)


def nan_problem():
    """Samples 1 and 3 turn NaN once they leave a region: restarts inside the solve."""
    layer, x = contractive(batch=4, width=16)

    def f(z):
        out = layer(z, x) * 3.0
        poison = torch.zeros(4, 1, dtype=z.dtype)
        far = z[[1, 3]].norm(dim=1, keepdim=True) > 2
        poison[[1, 3]] = torch.where(far, math.nan, 0.0).to(z.dtype)
        return out + poison

    return f, torch.zeros_like(x)


def make_problem(kind):
    if kind == "tensor":
        layer, x = hard(batch=3, width=12)
        return (lambda z: layer(z, x)), torch.zeros_like(x)
    if kind == "list":
        ms = MultiScale(batch=3, rho=0.95)
        return ms, ms.z0()
    if kind == "slow-sample":
        return slow_sample_problem()
    return nan_problem()


@pytest.mark.parametrize("kind", ["tensor", "list", "slow-sample", "nan"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_each_snapshot_equals_a_separate_solve(solver, kind):
    name = solver.split("-")[0]
    opts = SOLVERS[solver]
    f, z0 = make_problem(kind)
    solve = get_solver(name)
    tol = 1e-6
    with torch.no_grad():
        full = solve(f, z0, max_iter=20, tol=tol, snapshots=STEPS, **opts)
        assert sorted(full.snapshots) == list(STEPS)
        for k in STEPS:
            alone = solve(f, z0, max_iter=k, tol=tol, **opts)
            assert_same_result(full.snapshots[k], alone, f"{solver} {kind} step {k}")
            assert full.snapshots[k].snapshots == {}
    assert_same_result(full.snapshots[20], full, f"{solver} {kind} last")
    if kind == "slow-sample":
        # the stopping is per sample: sample 0 is done long before the others
        assert not bool(full.snapshots[8].converged[1:].all())
        if opts.get("beta", 1.0) == 1.0:  # (damped iteration only approaches it)
            assert int(full.snapshots[8].nstep[0]) == 2 and bool(full.snapshots[8].converged[0])
    if kind == "nan":
        assert full.nonfinite.tolist() == [False, True, False, True]


def test_snapshots_after_the_solve_stopped():
    """Budgets past the step where every sample converged give the final result."""
    layer, x = contractive(batch=3, width=10)
    f = lambda z: layer(z, x)  # noqa: E731
    with torch.no_grad():
        full = get_solver("anderson")(f, torch.zeros_like(x), max_iter=60, tol=1e-8, snapshots=[60])
        assert full.n_iter < 30 and bool(full.converged.all())
        assert_same_result(full.snapshots[60], full, "after stop")
        late = get_solver("anderson")(f, torch.zeros_like(x), max_iter=45, tol=1e-8)
        assert_same_result(full.snapshots[60], late, "budget 45")


def test_snapshot_arguments_are_checked():
    z0 = torch.zeros(2, 3)
    solve = get_solver("anderson")
    with pytest.raises(ValueError, match="snapshot step 9 is past the iteration budget max_iter=8"):
        solve(lambda z: z * 0.5, z0, max_iter=8, snapshots=(2, 9))
    with pytest.raises(ValueError, match="positive integers, got 0"):
        solve(lambda z: z * 0.5, z0, max_iter=8, snapshots=(0, 2))
    with pytest.raises(TypeError, match="sequence of steps"):
        solve(lambda z: z * 0.5, z0, max_iter=8, snapshots=4)
    res = solve(lambda z: z * 0.5, z0, max_iter=8, snapshots=(4, 2, 4))
    assert sorted(res.snapshots) == [2, 4]
    assert solve(lambda z: z * 0.5, z0, max_iter=8).snapshots == {}


@pytest.mark.parametrize("f_solver", ["anderson", "broyden", "fixed_point"])
@pytest.mark.parametrize("state", ["tensor", "list"])
def test_deq_forward_snapshots_equal_separate_forwards(f_solver, state):
    if state == "tensor":
        layer, x = hard(batch=3, width=12)
        z0 = torch.zeros_like(x)
    else:
        ms = MultiScale(batch=3, rho=0.95)
        layer, x, z0 = ms, ms.x, ms.z0()
    deq = DEQ(layer, f_solver=f_solver, f_thres=16, f_tol=1e-7).eval()
    steps = (1, 3, 7, 16)
    with torch.no_grad():
        z, info = deq(x, z0, snapshots=steps)
        assert sorted(info.snapshots) == list(steps)
        for k in steps:
            z_k, info_k = deq(x, z0, f_thres=k)
            snap = info.snapshots[k]
            flat = lambda s: torch.cat([t.reshape(3, -1) for t in s], 1) if state == "list" else s  # noqa: E731
            torch.testing.assert_close(flat(snap.result), flat(z_k), rtol=1e-12, atol=1e-14)
            assert torch.equal(snap.nstep, info_k.nstep)
            torch.testing.assert_close(snap.rel_residual, info_k.rel_residual, rtol=1e-12, atol=0)
        torch.testing.assert_close(flat(info.snapshots[16].result), flat(z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="past the iteration budget max_iter=16"):
        deq(x, z0, snapshots=(17,))
    with pytest.raises(ValueError, match="pretrain mode"):
        deq(x, z0, pretrain=True, snapshots=(2,))


def test_snapshot_results_are_independent_copies():
    """A snapshot is not changed by the iterations after it (the solvers never write
    into an iterate once it has been evaluated)."""
    layer, x = hard(batch=3, width=12)
    f = lambda z: layer(z, x)  # noqa: E731
    with torch.no_grad():
        full = get_solver("anderson")(f, torch.zeros_like(x), max_iter=20, tol=1e-12, snapshots=[5])
        five = get_solver("anderson")(f, torch.zeros_like(x), max_iter=5, tol=1e-12)
    assert torch.equal(full.snapshots[5].flat, five.flat)
    assert not torch.equal(full.snapshots[5].flat, full.flat)
    assert dataclasses.is_dataclass(full.snapshots[5])


@pytest.mark.parametrize("f_solver", ["broyden", "anderson", "fixed_point"])
def test_mdeq_snapshot_logits_equal_separate_forwards(f_solver):
    """One solve gives the logits of every budget, each equal to a forward at that f_thres."""
    from deqray.models import build

    torch.manual_seed(0)
    model = build(
        "mdeq-cifar-tiny", image_size=(16, 16), deq={"f_solver": f_solver, "f_tol": 1e-6}
    ).eval()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = (1, 2, 5, 9)
    by_budget, info = model.snapshot_logits(images, steps)
    assert sorted(by_budget) == list(steps) and sorted(info.snapshots) == list(steps)
    with torch.no_grad():
        for k in steps:
            logits, info_k = model(images, f_thres=k)
            torch.testing.assert_close(by_budget[k], logits, rtol=1e-5, atol=1e-6)
            assert torch.equal(info.snapshots[k].nstep, info_k.nstep)
            assert isinstance(info.snapshots[k].result, list)
    if f_solver != "fixed_point":  # (Picard iteration does not contract on this untrained f)
        # the budgets buy something: the residual falls from 1 step to 9
        last, first = info.snapshots[9].rel_residual, info.snapshots[1].rel_residual
        assert float(last.max()) < float(first.min())
