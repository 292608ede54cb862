"""The optimised solvers against plain reference steps written here, iterate for iterate.

The solvers keep their histories in preallocated buffers written in place,
update the Anderson Gram matrix by one row, keep Broyden's inverse Jacobian
estimate as low-rank pairs and skip the update after the last evaluation.
The references below do none of that: they recompute everything from its
definition at every step (the Anderson least-squares problem from the
chronological history, Broyden's estimate as a dense D x D matrix with its
rank reduction as a truncated SVD). Every input the solver hands to f must
equal the reference's, to float64 rounding, and so must the returned state.
"""

from __future__ import annotations

import pytest
import torch

from deqray.core import anderson, broyden, fixed_point

from .helpers import MultiScale, contractive, hard


class Recorder:
    """f that keeps a copy of every (flattened) input it is called with."""

    def __init__(self, f):
        self.f, self.inputs = f, []

    def __call__(self, z):
        flat = torch.cat([t.reshape(t.shape[0], -1) for t in z], 1) if isinstance(z, list) else z
        self.inputs.append(flat.detach().clone())
        return self.f(z)


def ref_best(f, inputs):
    """Per sample, the input with the lowest relative residual (the first such one)."""
    best = inputs[0].clone()
    best_r = torch.full((best.shape[0],), float("inf"), dtype=best.dtype)
    for z in inputs:
        fz = f(z)
        r = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
        better = r < best_r
        best[better], best_r[better] = z[better], r[better]
    return best


def ref_fixed_point(f, z, steps, beta):
    zs = [z]
    for _ in range(steps - 1):
        z = z + beta * (f(z) - z)
        zs.append(z)
    return zs


def ref_anderson(f, z, steps, m, beta, lam):
    """Anderson type II from its definition: the least-squares problem over the last m
    differences in chronological order, solved afresh at every step."""
    tiny = torch.finfo(z.dtype).tiny ** 0.5
    zs, gs, ys = [z], [], []
    for _ in range(steps - 1):
        g = f(z) - z
        y = z + beta * g
        gs.append(g)
        ys.append(y)
        n = min(len(gs) - 1, m)
        if n == 0:
            z = y
        else:
            dG = torch.stack([gs[-i] - gs[-i - 1] for i in range(n, 0, -1)], 1)  # (B, n, D)
            dY = torch.stack([ys[-i] - ys[-i - 1] for i in range(n, 0, -1)], 1)
            H = dG @ dG.transpose(1, 2)
            reg = lam * dG.pow(2).sum(2) + lam * dY.pow(2).sum(2) + tiny
            H = H + torch.diag_embed(reg)
            gamma = torch.linalg.solve(H, (dG @ g.unsqueeze(2))).squeeze(2)
            z = y - (gamma.unsqueeze(1) @ dY).squeeze(1)
        zs.append(z)
    return zs


def ref_broyden(f, z, steps, memory, policy, max_iter):
    """Good Broyden with a dense inverse-Jacobian estimate Bm = -I + (sum of rank-one updates);
    when `mem` updates are stored, Bm + I is replaced by its best rank-mem//2 approximation
    (truncated SVD), or dropped (restart)."""
    B, D = z.shape
    eye = torch.eye(D, dtype=z.dtype).expand(B, D, D)
    Bm = -eye.clone()
    mem = max(1, min(memory, max_iter - 1))
    keep = mem // 2 if policy == "compress" else 0
    thresh = torch.finfo(z.dtype).tiny ** 0.5
    g = f(z) - z
    zs = [z]
    z_prev, g_prev = z, g
    z = z + g
    zs.append(z)
    count = 0
    for _ in range(steps - 2):
        g = f(z) - z
        dz, dg = z - z_prev, g - g_prev
        vt = (Bm.transpose(1, 2) @ dz.unsqueeze(2)).squeeze(2)
        den = (vt * dg).sum(1, keepdim=True)
        inv = torch.where(den.abs() > thresh, 1 / den, torch.zeros_like(den))
        u = (dz - (Bm @ dg.unsqueeze(2)).squeeze(2)) * inv
        Bm = Bm + u.unsqueeze(2) * vt.unsqueeze(1)
        count += 1
        if count == mem:
            P, S, Vh = torch.linalg.svd(Bm + eye)
            low = (P[:, :, :keep] * S[:, None, :keep]) @ Vh[:, :keep]
            Bm = -eye + low
            count = keep
        z_prev, g_prev = z, g
        z = z - (Bm @ g.unsqueeze(2)).squeeze(2)
        zs.append(z)
    return zs


def problems():
    layer_c, x_c = contractive(batch=3, width=10)
    layer_h, x_h = hard(batch=3, width=12)
    ms = MultiScale(batch=3)
    return {
        "contractive": (lambda z: layer_c(z, x_c), torch.zeros_like(x_c), None),
        "hard": (lambda z: layer_h(z, x_h), torch.zeros_like(x_h), None),
        "list": (ms, ms.z0(), ms),
    }


def flat_f(f, ms):
    """The problem's f on the flattened state (the references work on matrices)."""
    if ms is None:
        return f
    return lambda z: ms.flat(ms(ms.split(z)))


CASES = [
    ("fixed_point", dict(beta=1.0)),
    ("fixed_point", dict(beta=0.7)),
    ("anderson", dict(m=5, beta=1.0, lam=1e-4)),
    ("anderson", dict(m=3, beta=0.8, lam=1e-2)),
    ("anderson", dict(m=2, beta=1.0, lam=0.0)),
    ("broyden", dict(memory=40, memory_policy="compress")),
    ("broyden", dict(memory=5, memory_policy="compress")),
    ("broyden", dict(memory=4, memory_policy="restart")),
]


@pytest.mark.parametrize("problem", ["contractive", "hard", "list"])
@pytest.mark.parametrize("name, opts", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_iterates_equal_the_reference(name, opts, problem):
    f, z0, ms = problems()[problem]
    steps = 25
    rec = Recorder(f if ms is None else lambda z: ms(z))
    solver = {"fixed_point": fixed_point, "anderson": anderson, "broyden": broyden}[name]
    with torch.no_grad():
        res = solver(rec, z0, max_iter=steps, tol=1e-300, **opts)
        ff = flat_f(f, ms)
        z0_flat = rec.inputs[0]
        if name == "fixed_point":
            ref = ref_fixed_point(ff, z0_flat, steps, opts["beta"])
        elif name == "anderson":
            ref = ref_anderson(ff, z0_flat, steps, opts["m"], opts["beta"], opts["lam"])
        else:
            ref = ref_broyden(ff, z0_flat, steps, opts["memory"], opts["memory_policy"], steps)
    assert res.nfe == steps == len(rec.inputs) == len(ref)
    for k, (ours, theirs) in enumerate(zip(rec.inputs, ref, strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11, msg=f"step {k + 1}")
    flat = res.flat
    torch.testing.assert_close(flat, ref_best(ff, ref), rtol=1e-9, atol=1e-11)
    if ms is not None:
        assert [tuple(t.shape) for t in res.result] == [tuple(t.shape) for t in z0]


def test_broyden_compresses_in_these_cases():
    """The memory=5 case must reach its rank reduction within the 25 steps compared above
    (else the reference's SVD branch would go untested)."""
    f, z0, _ = problems()["hard"]
    calls = []
    from deqray.core import solvers

    real = solvers._compress

    def spy(*args):
        calls.append(args[2])
        return real(*args)

    solvers._compress = spy
    try:
        with torch.no_grad():
            broyden(f, z0, max_iter=25, tol=1e-300, memory=5)
    finally:
        solvers._compress = real
    assert calls and all(n == 5 for n in calls)
