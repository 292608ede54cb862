"""Gradients through the equilibrium against dense linear solves and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deqray.core import DEQ, attach_implicit, phantom

from .helpers import MultiScale, contractive, hard

TIGHT = dict(f_thres=300, f_tol=1e-13, b_thres=300, b_tol=1e-13)


def dense_grads(layer, x, w):
    """d(sum w*z*)/d(x, W) from (I - J)^T u = w solved densely at the Newton fixed point."""
    z = layer.newton_fixed_point(x)
    J = layer.jacobian(z, x)
    eye = torch.eye(J.shape[1], dtype=J.dtype)
    u = torch.linalg.solve((eye - J).transpose(1, 2), w.unsqueeze(2)).squeeze(2)
    xr = x.detach().clone().requires_grad_()
    gx, gW = torch.autograd.grad(layer(z, xr), [xr, layer.lin.weight], u)
    return gx, gW


def deq_grads(layer, x, w, **cfg):
    deq = DEQ(layer, **cfg)
    xr = x.detach().clone().requires_grad_()
    z, info = deq(xr, torch.zeros_like(x))
    gx, gW = torch.autograd.grad((z * w).sum(), [xr, layer.lin.weight])
    return gx, gW, info


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("b_solver", ["anderson", "broyden", "fixed_point"])
@pytest.mark.parametrize("problem", ["contractive", "hard"])
def test_implicit_matches_dense_solve(b_solver, problem):
    layer, x = contractive() if problem == "contractive" else hard()
    w = torch.randn_like(x)
    ox, oW = dense_grads(layer, x, w)
    cfg = dict(TIGHT, b_solver=b_solver)
    if problem == "hard" and b_solver == "fixed_point":
        cfg.update(b_thres=3000)  # Picard contracts at 0.98 per step here
    gx, gW, info = deq_grads(layer, x, w, **cfg)
    assert rel_err(gx, ox) <= 1e-4
    assert rel_err(gW, oW) <= 1e-4
    assert info.backward.calls == 1 and bool(info.backward.result.converged.all())


def test_implicit_matches_finite_differences():
    """Independent of any linear algebra: perturb the input, solve again."""
    layer, x = contractive(batch=2, width=10)
    w = torch.randn_like(x)
    gx, _, _ = deq_grads(layer, x, w, **TIGHT)
    deq = DEQ(layer, **TIGHT)

    def loss(xx):
        with torch.no_grad():
            z, _ = deq(xx, torch.zeros_like(xx))
        return float((z * w).sum())

    eps = 1e-6
    fd = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[i, j] = eps
            fd[i, j] = (loss(x + e) - loss(x - e)) / (2 * eps)
    assert rel_err(gx, fd) <= 1e-6


def test_implicit_list_state_matches_dense_solve():
    ms = MultiScale()
    z_star = ms.newton()
    fz = torch.tanh(z_star @ ms.W.T + ms.x)
    J = (1 - fz**2).unsqueeze(2) * ms.W.detach()
    w = torch.randn_like(z_star)
    u = torch.linalg.solve((torch.eye(53, dtype=J.dtype) - J).transpose(1, 2), w.unsqueeze(2))
    xr = ms.x.clone().requires_grad_()
    (ox,) = torch.autograd.grad(torch.tanh(z_star @ ms.W.T + xr), xr, u.squeeze(2))

    deq = DEQ(ms, **TIGHT)
    xr = ms.x.clone().requires_grad_()
    zs, info = deq(xr, ms.z0())
    assert [tuple(t.shape) for t in zs] == [(4, 3, 4, 4), (4, 5)]
    (gx,) = torch.autograd.grad((ms.flat(zs) * w).sum(), xr)
    assert rel_err(gx, ox) <= 1e-4


def test_phantom_converges_to_implicit():
    layer, x = contractive()
    w = torch.randn_like(x)
    ox, _ = dense_grads(layer, x, w)
    errs = []
    for k in (1, 3, 10, 40):
        gx, _, _ = deq_grads(
            layer, x, w, **TIGHT, grad="phantom", phantom_steps=k, phantom_damping=0.8
        )
        errs.append(rel_err(gx, ox))
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] <= 1e-6 and errs[0] > 1e-2


def test_unrolled_matches_implicit_on_contractive_problem():
    layer, x = contractive()
    w = torch.randn_like(x)
    ox, oW = dense_grads(layer, x, w)
    gx, gW, info = deq_grads(layer, x, w, grad="unrolled", f_thres=200, f_tol=1e-14)
    assert rel_err(gx, ox) <= 1e-8 and rel_err(gW, oW) <= 1e-8
    assert info.forward.solver == "fixed_point"


def test_phantom_helper_validates():
    with pytest.raises(ValueError, match="steps"):
        phantom(lambda z: z, torch.zeros(2, 2), steps=0)
    with pytest.raises(ValueError, match="damping"):
        phantom(lambda z: z, torch.zeros(2, 2), damping=1.5)


def test_backward_stats_readable_after_backward():
    layer, x = contractive()
    deq = DEQ(layer, b_tol=1e-9, b_thres=50)
    xr = x.clone().requires_grad_()
    z, info = deq(xr, torch.zeros_like(x))
    assert info.backward.result is None and "bwd_nstep" not in info.metrics()
    (z * 2).sum().backward()
    m = info.metrics()
    assert info.backward.calls == 1
    assert m["bwd_converged"] == 1.0 and m["bwd_rel_residual_max"] <= 1e-9
    assert 1 <= m["bwd_nstep"] <= 50


def test_reentrant_forwards_do_not_clobber_each_other():
    """Two forwards in flight, backward in the opposite order: each gets its own solve."""
    layer, x = contractive()
    w1, w2 = torch.randn_like(x), torch.randn_like(x)
    o1, _ = dense_grads(layer, x, w1)
    o2, _ = dense_grads(layer, x * 0.5, w2)
    deq = DEQ(layer, **TIGHT)
    x1 = x.clone().requires_grad_()
    x2 = (x * 0.5).clone().requires_grad_()
    z1, i1 = deq(x1, torch.zeros_like(x))
    z2, i2 = deq(x2, torch.zeros_like(x))
    (g2,) = torch.autograd.grad((z2 * w2).sum(), x2)
    (g1,) = torch.autograd.grad((z1 * w1).sum(), x1)
    assert rel_err(g1, o1) <= 1e-8 and rel_err(g2, o2) <= 1e-8
    assert i1.backward.calls == 1 and i2.backward.calls == 1
    assert i1.backward.result is not i2.backward.result


def test_attach_implicit_requires_a_graph_leaf():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="require grad"):
        attach_implicit(z * 2, z)


# ----------------------------------------------------------------------------- DDP


class _Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.deq = DEQ(layer, **TIGHT)
        self.head = nn.Linear(layer.lin.weight.shape[0], 1, dtype=torch.float64)

    def forward(self, x):
        z, _ = self.deq(x, torch.zeros_like(x))
        return self.head(z).sum()


def _ddp_worker(rank, world, store_path, state, x, out_path):
    # a file rendezvous: no TCP port to race for when several test runs share the machine
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        layer, _ = contractive(batch=x.shape[0], width=x.shape[1])
        net = _Net(layer)
        net.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(net)
        shard = x.chunk(world)[rank]
        for _ in range(2):  # twice: hooks from the first step must not linger
            ddp.zero_grad()
            (ddp(shard) * world / x.shape[0]).backward()
        if rank == 0:
            torch.save({k: p.grad.clone() for k, p in net.named_parameters()}, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    torch.manual_seed(0)
    layer, x = contractive(batch=8, width=12)
    net = _Net(layer)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.zero_grad()
    (net(x) / x.shape[0]).backward()
    expected = {k: p.grad.clone() for k, p in net.named_parameters()}

    out_path = str(tmp_path / "grads.pt")
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "rendezvous"), state, x, out_path),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    got = torch.load(out_path)
    assert got.keys() == expected.keys()
    for k in expected:
        assert rel_err(got[k], expected[k]) <= 1e-10, k
