"""Weight norm computed once per DEQ forward; variational dropout fixed within a forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deqray.core import (
    DEQ,
    VariationalDropout,
    VariationalDropout2d,
    apply_weight_norm,
    dropout_scope,
    weight_norm_cache,
)


class WNCell(nn.Module):
    def __init__(self, d=16, p=0.0):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.drop = VariationalDropout(p, shared_dims=())
        apply_weight_norm(self)
        with torch.no_grad():
            self.a.parametrizations.weight.original0.mul_(0.3)  # g: keep f contractive
            self.b.parametrizations.weight.original0.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.b(self.drop(torch.tanh(self.a(z)))) + x)


def count_weight_norm_calls(cell):
    calls = []
    for m in (cell.a, cell.b):
        m.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("grad", ["implicit", "phantom", "unrolled"])
def test_weight_norm_computed_once_per_forward(grad):
    torch.manual_seed(0)
    cell = WNCell().double()
    calls = count_weight_norm_calls(cell)
    deq = DEQ(cell, f_thres=40, f_tol=1e-10, grad=grad)
    x = torch.randn(4, 16, dtype=torch.float64)
    z, info = deq(x, torch.zeros_like(x))
    assert info.nfe > 5
    assert len(calls) == 2  # one per parametrised weight, not one per iteration
    z.sum().backward()
    assert len(calls) == 2  # the backward reuses the forward's weights
    assert cell.a.parametrizations.weight.original1.grad is not None


def test_cached_weight_norm_gives_the_same_gradients():
    """The cache is an optimisation only: gradients equal those of plain recomputation."""
    torch.manual_seed(0)
    cell = WNCell().double()
    x = torch.randn(4, 16, dtype=torch.float64)
    deq = DEQ(cell, f_thres=60, f_tol=1e-12, b_tol=1e-12, b_thres=60)
    z, _ = deq(x, torch.zeros_like(x))
    g_cached = torch.autograd.grad(z.sum(), list(cell.parameters()))

    # the same computation with no cache, through a plain weight-tied unroll
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(200):
            z = cell(z, x)
    z = z.requires_grad_()
    fz = cell(z, x)
    J = torch.autograd.functional.jacobian(lambda zz: cell(zz, x).sum(0), z).permute(1, 0, 2)
    u = torch.linalg.solve(
        torch.eye(16, dtype=J.dtype) - J.transpose(1, 2), torch.ones(4, 16, 1, dtype=J.dtype)
    )
    g_plain = torch.autograd.grad(fz, list(cell.parameters()), u.squeeze(2))
    for a, b in zip(g_cached, g_plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_weight_norm_cache_outside_deq_and_no_grad_solver():
    cell = WNCell()
    assert parametrize.is_parametrized(cell.a, "weight")
    calls = count_weight_norm_calls(cell)
    with weight_norm_cache(cell):
        with torch.no_grad():
            for _ in range(5):
                cell(torch.zeros(2, 16), torch.zeros(2, 16))
        w = cell.a.weight
    assert len(calls) == 2
    assert w.requires_grad and w.grad_fn is not None  # filled in grad mode, before no_grad


def test_variational_dropout_mask_fixed_within_scope_and_redrawn_across():
    torch.manual_seed(0)
    drop = VariationalDropout(0.5, shared_dims=(1,))
    x = torch.ones(8, 5, 6)
    with dropout_scope():
        a, b = drop(x), drop(x)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :1].expand_as(a), a)  # shared along dim 1
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    with dropout_scope():
        c = drop(x)
    assert not torch.equal(a, c)
    assert not torch.equal(drop(x), drop(x))  # outside a scope: fresh each call
    drop.eval()
    assert torch.equal(drop(x), x)


def test_variational_dropout_preserves_expectation():
    torch.manual_seed(0)
    drop = VariationalDropout2d(0.3)
    x = torch.ones(4000, 3, 2, 2)
    y = drop(x)
    assert torch.equal(y[:, :, :1, :1].expand_as(y), y)  # one value per sample and channel
    assert abs(float(y.mean()) - 1.0) < 0.03
    with pytest.raises(ValueError, match="probability"):
        VariationalDropout(1.0)


def test_deq_with_dropout_solves_one_fixed_function():
    """Masks drawn once per forward: the solver converges to tolerance in training mode.

    With a fresh mask per call, f would change at every iteration and the
    residual could not fall below the dropout noise.
    """
    torch.manual_seed(0)
    cell = WNCell(p=0.3).double().train()
    x = torch.randn(4, 16, dtype=torch.float64)
    deq = DEQ(cell, f_thres=60, f_tol=1e-10).train()
    z, info = deq(x, torch.zeros_like(x))
    assert bool(info.converged.all())
    z2, _ = deq(x, torch.zeros_like(x))  # a new forward: a new mask
    assert not torch.allclose(z, z2)
