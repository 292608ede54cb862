"""Reference fixed-point problems with dense oracles, for tests and benchmarks.

`TanhLayer` is f(z, x) = tanh(W z + x): one weight matrix and an input
injection x computed once outside the solver, as in the DEQ papers. Its
Jacobian is known in closed form, J(z) = diag(1 - tanh(.)^2) W per sample,
so fixed points (Newton with dense solves), spectral radii (dense
eigenvalues) and implicit gradients (dense solves of (I - J)^T) can be
checked without trusting any iterative code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TanhLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(torch.addmm(x, z, self.lin.weight.t()))

    def jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """(B, D, D) dense Jacobian df/dz at z."""
        with torch.no_grad():
            s = 1 - self(z, x).pow(2)
            return s.unsqueeze(2) * self.lin.weight.unsqueeze(0)

    def newton_fixed_point(self, x: Tensor, *, iters: int = 50) -> Tensor:
        """The fixed point by Newton's method with dense solves (an oracle)."""
        with torch.no_grad():
            z = torch.zeros(x.shape[0], self.lin.weight.shape[0], dtype=x.dtype, device=x.device)
            eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
            for _ in range(iters):
                r = z - self(z, x)
                if float(r.norm(dim=1).max()) < 1e-13 * max(1.0, float(z.norm(dim=1).max())):
                    break
                J = self.jacobian(z, x)
                z = z - torch.linalg.solve(eye - J, r.unsqueeze(2)).squeeze(2)
            return z

    def spectral_radius(self, z: Tensor, x: Tensor) -> Tensor:
        """(B,) exact spectral radius of J at z (dense eigenvalues)."""
        J = self.jacobian(z, x).double()
        return torch.linalg.eigvals(J).abs().amax(dim=1).to(z.dtype)


def tanh_problem(
    batch: int,
    width: int,
    *,
    rho: float,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    x_scale: float = 1.0,
    calibrate: bool = True,
) -> tuple[TanhLayer, Tensor]:
    """A TanhLayer and inputs x whose fixed points have Jacobian spectral radius ~`rho`.

    W is a Gaussian matrix (complex eigenvalues filling a disc, as in trained
    DEQs), first scaled to spectral radius `rho`. With `calibrate`, the scale
    is then adjusted so that the largest rho(J(z*)) over the batch is `rho`
    (J shrinks W where tanh saturates; a small `x_scale` keeps the batch's
    radii close together), using Newton fixed points and dense eigenvalues.
    Returns (layer, x) in `dtype`.
    """
    gen = torch.Generator().manual_seed(seed)
    layer = TanhLayer(width)
    with torch.no_grad():
        W = torch.randn(width, width, generator=gen, dtype=torch.float64)
        W /= torch.linalg.eigvals(W).abs().max()
        x = torch.randn(batch, width, generator=gen, dtype=torch.float64) * x_scale
        layer = layer.double()

        def max_rho(scale: float) -> float:
            layer.lin.weight.copy_(W * scale)
            z = layer.newton_fixed_point(x)
            return float(layer.spectral_radius(z, x).max())

        scale = rho
        if calibrate:
            # Illinois regula falsi on h(c) = max rho(J(z*(c))) - rho, increasing in c.
            lo, hi = rho, rho * 1.25
            h_lo, h_hi = max_rho(lo) - rho, max_rho(hi) - rho
            while h_hi < 0:
                lo, h_lo, hi = hi, h_hi, hi * 1.25
                h_hi = max_rho(hi) - rho
            side = 0
            for _ in range(40):
                scale = hi - h_hi * (hi - lo) / (h_hi - h_lo)
                h = max_rho(scale) - rho
                if abs(h) < 1e-5:
                    break
                if h > 0:
                    hi, h_hi = scale, h
                    if side == 1:
                        h_lo /= 2
                    side = 1
                else:
                    lo, h_lo = scale, h
                    if side == -1:
                        h_hi /= 2
                    side = -1
        layer.lin.weight.copy_(W * scale)
    return layer.to(dtype), x.to(dtype)
