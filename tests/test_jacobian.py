"""Hutchinson ||J||_F^2 and the power-method spectral radius against dense Jacobians."""

from __future__ import annotations

import math

import pytest
import torch

from deqray.core import frobenius_per_dim, jac_loss_estimate, spectral_radius
from deqray.core.problems import TanhLayer

from .helpers import contractive, hard


def at_fixed_point(layer, x):
    z = layer.newton_fixed_point(x).requires_grad_()
    return z, layer(z, x)


def test_hutchinson_matches_exact_frobenius_norm():
    torch.manual_seed(0)
    layer, x = contractive(batch=3, width=12)
    z, fz = at_fixed_point(layer, x)
    exact = layer.jacobian(z.detach(), x).pow(2).sum((1, 2))  # (B,)
    n = 4000
    draws = torch.stack(
        [jac_loss_estimate(fz, z, create_graph=False) for _ in range(n)]
    )  # (n, B): each an unbiased single-probe estimate
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(n)
    assert torch.all((mean - exact).abs() <= 4 * se), (mean, exact, se)
    # averaging probes inside one call is the same estimator
    many = jac_loss_estimate(fz, z, n_samples=2000, create_graph=False)
    assert torch.allclose(many, exact, rtol=0.1)


def test_jacobian_loss_is_differentiable_and_unbiased_in_gradient():
    """E[d est/dW] = d ||J||_F^2 / dW, with z* held fixed (as in training)."""
    torch.manual_seed(1)
    layer, x = contractive(batch=2, width=8)
    z = layer.newton_fixed_point(x).requires_grad_()

    def exact_of(W):
        s = 1 - torch.tanh(z.detach() @ W.T + x).pow(2)
        return (s.unsqueeze(2) * W.unsqueeze(0)).pow(2).sum()

    W = layer.lin.weight
    (g_exact,) = torch.autograd.grad(exact_of(W), W)
    fz = layer(z, x)
    est = jac_loss_estimate(fz, z, n_samples=3000, create_graph=True).sum()
    (g_est,) = torch.autograd.grad(est, W)
    assert float((g_est - g_exact).norm() / g_exact.norm()) < 0.05


def test_frobenius_per_dim_normalisation():
    est = torch.tensor([4.0, 8.0])
    assert float(frobenius_per_dim(est, 4)) == 1.5


@pytest.mark.parametrize("problem", ["contractive", "hard"])
def test_power_method_matches_dense_eigenvalues_real_spectrum(problem):
    """Symmetric W: J = diag(s) W is similar to a symmetric matrix, real spectrum."""
    gen = torch.Generator().manual_seed(5)
    d = 24
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    lam = torch.linspace(-0.5, 0.6, d, dtype=torch.float64)
    lam[-1] = 0.9 if problem == "contractive" else 0.985
    layer = TanhLayer(d).double()
    with torch.no_grad():
        layer.lin.weight.copy_(Q @ torch.diag(lam) @ Q.T)
    x = 0.1 * torch.randn(4, d, generator=gen, dtype=torch.float64)
    z, fz = at_fixed_point(layer, x)
    exact = layer.spectral_radius(z.detach(), x)
    est = spectral_radius(fz, z, n_iter=300, seed=0)
    assert torch.allclose(est, exact, rtol=1e-3), (est, exact)


def test_power_method_on_a_dominant_complex_pair():
    """A rotation block: the plain ratio oscillates, the geometric mean does not."""
    theta, rho = 0.7, 0.9
    A = torch.zeros(6, 6, dtype=torch.float64)
    A[:2, :2] = rho * torch.tensor(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    )
    A[2:, 2:] = torch.diag(torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float64))
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    fz = z @ A.T
    est = spectral_radius(fz, z, n_iter=400, seed=1)
    assert torch.allclose(est, torch.full_like(est, rho), rtol=1e-2), est


def test_spectral_radius_of_hard_problem():
    layer, x = hard(batch=3, width=32)
    z, fz = at_fixed_point(layer, x)
    exact = layer.spectral_radius(z.detach(), x)
    est = spectral_radius(fz, z, n_iter=600, seed=0)
    # random (non-normal) W: slower, but within a few percent
    assert torch.allclose(est, exact, rtol=3e-2), (est, exact)
