"""The DEQ module: config validation, modes, statistics, and a small model that learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqray.core import DEQ, DEQConfig

from .helpers import MultiScale, contractive


def test_config_rejects_unknown_keys_with_suggestion():
    with pytest.raises(ValueError, match=r"unknown key 'f_thresh' \(did you mean 'f_thres'\?\)"):
        DEQConfig.build({"f_thresh": 10})
    with pytest.raises(ValueError, match="my.yaml: unknown key 'b_tool'"):
        DEQConfig.build({"b_tool": 1e-3}, where="my.yaml")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"f_thres": "30"}, r"f_thres must be int, got '30' \(str\)"),
        ({"f_thres": True}, "f_thres must be int"),
        ({"f_tol": None}, "f_tol must be float"),
        (
            {"f_solver": "andersn"},
            r"f_solver: unknown solver 'andersn' \(did you mean 'anderson'\?\)",
        ),
        ({"grad": "implict"}, r"grad must be one of .* \(did you mean 'implicit'\?\)"),
        ({"f_thres": 0}, "f_thres must be >= 1"),
        ({"b_tol": -1.0}, "b_tol must be > 0"),
        ({"phantom_damping": 0.0}, "phantom_damping"),
        ({"f_stop_mode": "max"}, "f_stop_mode"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DEQConfig.build(bad)


def test_config_sources_combine():
    base = DEQConfig(f_thres=12)
    cfg = DEQConfig.build(base, b_solver="broyden")
    assert cfg.f_thres == 12 and cfg.b_solver == "broyden"
    assert DEQConfig.build({"f_tol": 1}).f_tol == 1  # ints are fine for floats
    deq = DEQ(nn.Identity(), {"f_thres": 7}, eval_f_thres=9)
    assert deq.config.f_thres == 7 and deq.config.eval_f_thres == 9
    assert "f_thres=7" in repr(deq)


def test_modes_agree_on_the_equilibrium():
    layer, x = contractive()
    z0 = torch.zeros_like(x)
    outs = {}
    for grad in ("implicit", "phantom", "unrolled"):
        deq = DEQ(layer, grad=grad, f_thres=200, f_tol=1e-12, phantom_steps=3)
        outs[grad], info = deq(x.clone().requires_grad_(), z0)
        assert info.mode == "deq" and bool(info.converged.all())
    z_star = layer.newton_fixed_point(x)
    for z in outs.values():
        assert torch.allclose(z, z_star, atol=1e-10)


def test_pretrain_is_a_weight_tied_network():
    layer, x = contractive()
    deq = DEQ(layer, pretrain_layers=3)
    z0 = torch.zeros_like(x)
    z, info = deq(x, z0, pretrain=True)
    expected = layer(layer(layer(z0, x), x), x)
    assert torch.allclose(z, expected)
    assert info.mode == "pretrain" and info.nfe == 3 and info.forward is None
    assert z.requires_grad  # ordinary backprop
    # residual of the last layer's input: the change the last layer made
    z2 = layer(layer(z0, x), x)
    rel = (z - z2).norm(dim=1) / z.norm(dim=1)
    assert torch.allclose(info.rel_residual, rel.detach(), rtol=1e-6)
    z, info = deq(x, z0, pretrain=True, jac_loss=True, sradius=True)
    assert info.jac_loss.requires_grad and info.sradius.shape == (x.shape[0],)


def test_thresholds_in_train_and_eval_and_per_call():
    layer, x = contractive()
    deq = DEQ(layer, f_thres=3, eval_f_thres=7, f_tol=1e-14)
    z0 = torch.zeros_like(x)
    _, info = deq(x, z0)
    assert info.nfe == 3
    deq.eval()
    with torch.no_grad():
        _, info = deq(x, z0)
    assert info.nfe == 7
    _, info = deq(x, z0, f_thres=5)
    assert info.nfe == 5


def test_f_thres_jitter_in_training_only():
    layer, x = contractive()
    deq = DEQ(layer, f_thres=10, f_thres_jitter=3, eval_f_thres=12, f_tol=1e-30)
    z0 = torch.zeros_like(x)
    torch.manual_seed(0)
    seen = {deq(x, z0)[1].nfe for _ in range(40)}
    assert seen <= set(range(7, 14)) and len(seen) >= 5
    deq.eval()
    assert {deq(x, z0)[1].nfe for _ in range(5)} == {12}
    with pytest.raises(ValueError, match="f_thres_jitter"):
        DEQConfig.build(f_thres=5, f_thres_jitter=5)


def test_no_grad_forward_returns_the_solver_result_without_graph():
    layer, x = contractive()
    deq = DEQ(layer)
    with torch.no_grad():
        z, info = deq(x, torch.zeros_like(x), sradius=True)
    assert not z.requires_grad
    assert torch.equal(z, info.forward.result)
    exact = layer.spectral_radius(layer.newton_fixed_point(x), x)
    assert torch.allclose(info.sradius, exact, rtol=0.1)


def test_jacobian_loss_and_metrics():
    layer, x = contractive()
    deq = DEQ(layer)
    z, info = deq(x.clone().requires_grad_(), torch.zeros_like(x), jac_loss=True, sradius=True)
    assert info.jac_loss.dim() == 0 and info.jac_loss.requires_grad
    (z.sum() + info.jac_loss).backward()
    m = info.metrics()
    for key in (
        "fwd_nstep",
        "fwd_rel_residual",
        "fwd_converged",
        "fwd_nfe",
        "jac_loss",
        "sradius",
        "bwd_nstep",
        "bwd_converged",
        "fwd_nonfinite",
    ):
        assert key in m and isinstance(m[key], float)
    assert layer.lin.weight.grad is not None


def test_list_state_and_init_state():
    ms = MultiScale()

    class WithInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ms

        def forward(self, zs, x):
            return self.inner(zs, x)

        def init_state(self, x):
            return ms.z0()

    deq = DEQ(WithInit(), f_tol=1e-10, f_thres=100)
    zs, info = deq(ms.x)
    assert isinstance(zs, list) and bool(info.converged.all())
    with pytest.raises(ValueError, match="init_state"):
        DEQ(ms)(ms.x)


def test_divergence_is_reported_in_the_info():
    layer, x = contractive()
    with torch.no_grad():
        layer.lin.weight.mul_(6.0)  # far from contractive
    deq = DEQ(layer, f_solver="fixed_point", f_thres=20, f_tol=1e-8)
    _, info = deq(x, torch.zeros_like(x))
    assert info.metrics()["fwd_converged"] < 1.0


def test_a_deq_student_recovers_its_teacher():
    """Fit z*(x) of a teacher DEQ from a different start: implicit gradients lead the
    student's weights to the teacher's (the map x -> z* identifies W)."""
    from deqray.core.problems import tanh_problem

    teacher, _ = tanh_problem(1, 16, rho=0.7, seed=10, calibrate=False)
    student, _ = tanh_problem(1, 16, rho=0.3, seed=11, calibrate=False)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = teacher.newton_fixed_point(x)
    deq = DEQ(student, f_thres=50, f_tol=1e-8, b_thres=50, b_tol=1e-8)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        z, info = deq(x, torch.zeros_like(x))
        loss = (z - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 1e-4 * losses[0]
    W, Wt = student.lin.weight.detach(), teacher.lin.weight.detach()
    assert float((W - Wt).norm() / Wt.norm()) < 2e-2
    m = info.metrics()
    assert m["fwd_converged"] == 1.0 and m["bwd_converged"] == 1.0


@pytest.mark.parametrize("f_solver", ["anderson", "broyden"])
def test_autocast_runs_f_in_low_precision_and_the_solver_in_the_state_dtype(f_solver):
    layer, x = contractive(dtype=torch.float32)
    dtypes = []
    layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    deq = DEQ(layer, f_solver=f_solver, f_tol=1e-2, b_tol=1e-2)
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, info = deq(xr, torch.zeros_like(x), jac_loss=True)
        loss = z.float().pow(2).sum() + info.jac_loss
        loss.backward()  # inside the autocast region on purpose
    assert torch.bfloat16 in dtypes  # f ran in bf16 ...
    assert z.dtype == torch.float32  # ... the state and the solver did not
    assert bool(info.converged.all()) and info.backward.calls == 1
    assert torch.isfinite(xr.grad).all()
    with torch.no_grad():
        z32, _ = deq(x, torch.zeros_like(x))
    assert float((z.detach() - z32).norm() / z32.norm()) < 0.05  # bf16-level agreement
