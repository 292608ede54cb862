"""Solvers against Newton fixed points (dense solves), per sample, and under failure."""

from __future__ import annotations

import math

import pytest
import torch

from deqray.core import (
    SolverResult,
    anderson,
    available_solvers,
    broyden,
    fixed_point,
    get_solver,
    register_solver,
)

from .helpers import MultiScale, contractive, hard

SOLVERS = ["anderson", "broyden", "fixed_point"]


def residuals(f, z):
    fz = f(z)
    a = (fz - z).flatten(1).norm(dim=1)
    return a, a / (fz.flatten(1).norm(dim=1) + 1e-9)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_contractive_every_sample_reaches_tol(name, dtype):
    layer, x = contractive(dtype=dtype)
    f = lambda z: layer(z, x)  # noqa: E731
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    res = get_solver(name)(f, torch.zeros_like(x), max_iter=200, tol=tol)
    _, rel = residuals(f, res.result)
    assert bool(res.converged.all())
    assert float(rel.detach().max()) <= tol * 1.001  # recomputed, not taken from the solver
    z_star = layer.double().newton_fixed_point(x.double())
    layer.to(dtype)
    err = (res.result.double() - z_star).norm(dim=1) / z_star.norm(dim=1)
    assert float(err.detach().max()) < 50 * tol


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_hard_problem_per_sample(name):
    """rho(J(z*)) up to 0.98: accelerated solvers get every sample to 1e-6."""
    layer, x = hard()
    z_star = layer.newton_fixed_point(x)
    assert float(layer.spectral_radius(z_star, x).max()) == pytest.approx(0.98, abs=1e-3)
    f = lambda z: layer(z, x)  # noqa: E731
    res = get_solver(name)(f, torch.zeros_like(x), max_iter=300, tol=1e-6)
    _, rel = residuals(f, res.result)
    assert bool(res.converged.all()), res.rel_residual
    assert float(rel.detach().max()) <= 1e-6 * 1.001
    assert torch.allclose(res.result, z_star, atol=1e-4)
    # far fewer evaluations than plain iteration needs
    fp = fixed_point(f, torch.zeros_like(x), max_iter=300, tol=1e-6)
    assert res.nfe < 0.6 * fp.nfe


@pytest.mark.parametrize("name", SOLVERS)
def test_list_state_of_mixed_shapes(name):
    ms = MultiScale()
    res = get_solver(name)(ms, ms.z0(), max_iter=200, tol=1e-8)
    assert isinstance(res.result, list)
    assert [tuple(t.shape) for t in res.result] == [(4, 3, 4, 4), (4, 5)]
    flat = ms.flat(res.result)
    assert torch.allclose(flat, ms.newton(), atol=1e-7)
    assert bool(res.converged.all())


@pytest.mark.parametrize("name", SOLVERS)
def test_samples_judged_separately(name):
    """A small, slow sample must not hide behind large, fast ones.

    Sample 1 has a state 1000x smaller than the others and contracts at 0.97
    per step. A whole-batch residual (the reference's stopping rule) is
    dominated by the large samples and stops while sample 1 is far off.
    """
    layer, x = contractive(batch=4, width=16)
    c = torch.randn(16, dtype=torch.float64) * 1e-3
    slow = torch.tensor([False, True, False, False]).unsqueeze(1)
    W = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0] * 0.97  # rotation x 0.97

    f_norms = []  # ||f(z)|| at every step (a / r is 0 / 0 once a sample is exact)

    def f(z):
        out = torch.where(slow, z @ W.T + c, layer(z, x))
        f_norms.append(out.norm(dim=1))
        return out

    tol = 1e-8
    res = get_solver(name)(f, torch.zeros_like(x), max_iter=2000, tol=tol, stop_mode="rel")
    _, rel = residuals(f, res.result)
    assert float(rel.detach().max()) <= tol * 1.001
    if name == "fixed_point":  # (Broyden solves the linear sample in a few steps)
        a, r = res.abs_trace, res.rel_trace
        fn = torch.stack(f_norms[: res.n_iter])
        batch_rel = a.pow(2).sum(1).sqrt() / fn.pow(2).sum(1).sqrt()
        stop = int((batch_rel <= tol).nonzero()[0])
        assert float(r[stop, 1]) > 10 * tol


@pytest.mark.parametrize("name", SOLVERS)
def test_converged_sample_not_made_worse(name):
    """The returned iterate of each sample is its best one, whatever later steps did.

    Sample 0 converges in one step (f constant for it); the others take
    longer. The trace must show sample 0 at its minimum at the returned step.
    """
    layer, x = contractive(batch=3, width=16)

    def f(z):
        out = layer(z, x)
        return torch.cat([x[:1] * 0.1, out[1:]])

    res = get_solver(name)(f, torch.zeros_like(x), max_iter=200, tol=1e-10)
    trace = res.rel_trace
    for b in range(3):
        assert float(res.rel_residual[b]) == float(trace[:, b].min())
    assert int(res.nstep[0]) <= 2
    assert torch.equal(res.result[0], x[0] * 0.1)


@pytest.mark.parametrize("name", SOLVERS)
def test_nan_producing_f_is_reported_not_raised(name):
    """f turns NaN for samples 1 and 3 once they leave a region: no exception, no NaN out."""
    layer, x = contractive(batch=4, width=16)

    def f(z):
        out = layer(z, x) * 3.0  # not contractive: iterates grow
        poison = torch.zeros(4, 1, dtype=z.dtype)
        far = z[[1, 3]].norm(dim=1, keepdim=True) > 2
        poison[[1, 3]] = torch.where(far, math.nan, 0.0).to(z.dtype)
        return out + poison

    res = get_solver(name)(f, torch.zeros_like(x), max_iter=40, tol=1e-8)
    assert torch.isfinite(res.result).all()
    assert res.nonfinite.tolist() == [False, True, False, True]
    assert not bool(res.converged[1]) and not bool(res.converged[3])
    assert torch.isfinite(res.rel_residual[[0, 2]]).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_nan_everywhere_keeps_z0(name):
    z0 = torch.ones(3, 5, dtype=torch.float64)
    res = get_solver(name)(lambda z: z * math.nan, z0, max_iter=10, tol=1e-6)
    assert torch.equal(res.result, z0)
    assert res.nonfinite.all() and not res.converged.any()


@pytest.mark.parametrize("lam", [0.0, 1e-4])
def test_anderson_singular_system_no_fixed_point(lam):
    """f(z) = z + c: the differences of g are zero (or rounding noise), the Gram
    matrix singular. No exception, no NaN; with the default regularisation the
    noise columns do not blow the iterate up either."""
    c = torch.randn(4, 6, dtype=torch.float64)
    res = anderson(
        lambda z: z + c, torch.zeros_like(c), max_iter=20, tol=1e-8, lam=lam, stop_mode="abs"
    )
    assert torch.isfinite(res.result).all()
    assert torch.isfinite(res.abs_trace).all()
    if lam > 0:  # (with lam = 0, z runs off to ~1e17, where z + c == z in float64)
        assert not res.converged.any()
        assert float(res.result.abs().max()) < 20 * float(c.abs().max()) * 20


def test_anderson_singular_system_dependent_columns():
    """A linear map acting on a 1-D subspace: history columns are collinear (lam = 0)."""
    d = torch.randn(6, dtype=torch.float64)
    d = d / d.norm()
    P = 0.5 * torch.outer(d, d)
    b = torch.randn(2, 6, dtype=torch.float64)
    f = lambda z: z @ P.T + b  # noqa: E731
    res = anderson(f, torch.zeros_like(b), max_iter=30, tol=1e-10, lam=0.0, m=4)
    assert torch.isfinite(res.result).all()
    z_star = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - P, b.T).T
    assert torch.allclose(res.result, z_star, atol=1e-8)


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_max_iter_below_history_size(max_iter):
    layer, x = contractive(batch=3, width=8)
    f = lambda z: layer(z, x)  # noqa: E731
    for res in (
        anderson(f, torch.zeros_like(x), max_iter=max_iter, tol=1e-12, m=6),
        broyden(f, torch.zeros_like(x), max_iter=max_iter, tol=1e-12, memory=6),
    ):
        assert res.n_iter == max_iter == res.nfe
        assert res.abs_trace.shape == (max_iter, 3)
        assert torch.isfinite(res.result).all()
        assert not res.converged.any()


@pytest.mark.parametrize("policy", ["compress", "restart"])
def test_broyden_bounded_memory_still_converges(policy, monkeypatch):
    """Memory far below the steps needed: buffers stay at `memory` columns."""
    layer, x = hard(batch=3, width=32)
    f = lambda z: layer(z, x)  # noqa: E731
    sizes = []
    real_zeros = torch.Tensor.new_zeros

    def spy(self, *shape, **kw):
        sizes.append(tuple(shape[0] if len(shape) == 1 else shape))
        return real_zeros(self, *shape, **kw)

    monkeypatch.setattr(torch.Tensor, "new_zeros", spy)
    res = broyden(f, torch.zeros_like(x), max_iter=500, tol=1e-8, memory=6, memory_policy=policy)
    monkeypatch.undo()
    assert bool(res.converged.all())
    assert res.n_iter > 6
    assert sizes and all(s[1] <= 6 for s in sizes if len(s) == 3)


def test_broyden_rank_reduction_beats_restart():
    layer, x = hard(batch=3, width=32)
    f = lambda z: layer(z, x)  # noqa: E731
    runs = {
        p: broyden(f, torch.zeros_like(x), max_iter=500, tol=1e-8, memory=8, memory_policy=p)
        for p in ("compress", "restart")
    }
    assert runs["compress"].nfe < runs["restart"].nfe


def test_broyden_linear_problem_finite_steps():
    """On an affine map good Broyden terminates in at most 2n steps (Gay, 1979)."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    A = 0.9 * A / torch.linalg.eigvals(A).abs().max()
    b = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    res = broyden(lambda z: z @ A.T + b, torch.zeros_like(b), max_iter=25, tol=1e-10, memory=30)
    assert bool(res.converged.all())
    assert res.nfe <= 2 * 10 + 2


def test_abs_and_rel_stop_modes():
    layer, x = contractive(batch=3, width=8)
    f = lambda z: layer(z, x)  # noqa: E731
    r_abs = anderson(f, torch.zeros_like(x), max_iter=100, tol=1e-7, stop_mode="abs")
    a, _ = residuals(f, r_abs.result)
    assert float(a.detach().max()) <= 1e-7 * 1.001
    assert torch.equal(r_abs.lowest, r_abs.abs_residual)
    r_rel = anderson(f, torch.zeros_like(x), max_iter=100, tol=1e-7, stop_mode="rel")
    assert torch.equal(r_rel.lowest, r_rel.rel_residual)


def test_result_offers_reference_keys():
    layer, x = contractive(batch=2, width=8)
    res = anderson(lambda z: layer(z, x), torch.zeros_like(x), max_iter=50, tol=1e-6)
    assert isinstance(res, SolverResult)
    for key in ("result", "nstep", "abs_trace", "rel_trace", "lowest"):
        assert res[key] is getattr(res, key)
    assert res["nstep"].shape == (2,) and res["lowest"].shape == (2,)
    assert res.abs_trace.shape == (res.n_iter, 2)
    with pytest.raises(KeyError, match="did you mean 'lowest'"):
        res["lowes"]
    s = res.summary()
    assert s["converged_fraction"] == 1.0 and s["nfe"] == res.nfe
    assert (res.steps_to_tol <= res.n_iter).all()


def test_registry_and_errors():
    assert available_solvers() == ["anderson", "broyden", "fixed_point"]
    with pytest.raises(
        ValueError, match=r"did you mean 'anderson'.*anderson, broyden, fixed_point"
    ):
        get_solver("andersen")
    with pytest.raises(ValueError, match=r"unknown option 'mm' \(did you mean 'm'\?\)"):
        anderson(lambda z: z, torch.zeros(2, 2), mm=3)
    with pytest.raises(ValueError, match="stop_mode"):
        anderson(lambda z: z, torch.zeros(2, 2), stop_mode="max")
    with pytest.raises(ValueError, match="non-finite"):
        fixed_point(lambda z: z, torch.full((2, 2), math.nan))

    def newton_like(f, z0, *, max_iter=10, tol=1e-4, stop_mode="rel"):
        return fixed_point(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)

    register_solver("test_custom", newton_like)
    try:
        assert get_solver("test_custom") is newton_like
        with pytest.raises(ValueError, match="already registered"):
            register_solver("test_custom", newton_like)
        with pytest.raises(TypeError, match="max_iter"):
            register_solver("bad", lambda f, z0: None)
    finally:
        from deqray.core import solvers

        solvers._SOLVERS.pop("test_custom")


def test_structure_errors_name_the_state():
    z0 = [torch.zeros(2, 3), torch.zeros(2, 4)]
    with pytest.raises(ValueError, match=r"changed state element 1 from shape \(2, 4\)"):
        anderson(lambda zs: [zs[0], zs[1][:, :2]], z0)
    with pytest.raises(ValueError, match="batch size 3"):
        anderson(lambda zs: zs, [torch.zeros(2, 3), torch.zeros(3, 3)])


def test_fixed_point_is_differentiable():
    """fixed_point keeps autograd (unrolled mode differentiates through it)."""
    layer, x = contractive(batch=2, width=8)
    x = x.clone().requires_grad_()
    res = fixed_point(lambda z: layer(z, x), torch.zeros_like(x), max_iter=100, tol=1e-12)
    (g,) = torch.autograd.grad(res.result.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
