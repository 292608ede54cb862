"""Problems shared by the core tests, each with an independent oracle."""

from __future__ import annotations

import torch
from torch import nn

from deqray.core.problems import TanhLayer, tanh_problem


def contractive(batch=6, width=24, dtype=torch.float64, seed=0):
    """Tanh layer with rho(W) = 0.6: every solver converges fast."""
    layer, x = tanh_problem(batch, width, rho=0.6, seed=seed, dtype=dtype, calibrate=False)
    return layer, x


def hard(batch=6, width=48, dtype=torch.float64, seed=1):
    """Tanh layer calibrated so that the median rho(J(z*)) over the batch is 0.98."""
    return tanh_problem(batch, width, rho=0.98, seed=seed, dtype=dtype, x_scale=0.5)


class MultiScale(nn.Module):
    """f on a list state of mixed shapes [(B, 3, 4, 4), (B, 5)]: two coupled tanh maps.

    Exposes its dense Jacobian on the flattened state for oracles.
    """

    def __init__(self, batch=4, dtype=torch.float64, seed=2, rho=0.7):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.shapes = [(3, 4, 4), (5,)]
        d = 3 * 4 * 4 + 5
        W = torch.randn(d, d, generator=gen, dtype=torch.float64)
        W = W / torch.linalg.eigvals(W).abs().max() * rho
        self.W = nn.Parameter(W.to(dtype))
        self.x = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dtype)
        self.batch = batch

    def flat(self, zs):
        return torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1)

    def split(self, flat):
        a, b = flat.split([48, 5], dim=1)
        return [a.reshape(-1, 3, 4, 4), b.reshape(-1, 5)]

    def forward(self, zs, x=None):
        x = self.x if x is None else x
        return self.split(torch.tanh(self.flat(zs) @ self.W.T + x))

    def z0(self):
        return [torch.zeros(self.batch, *s, dtype=self.W.dtype) for s in self.shapes]

    def newton(self):
        with torch.no_grad():
            z = torch.zeros(self.batch, 53, dtype=self.W.dtype)
            eye = torch.eye(53, dtype=z.dtype)
            for _ in range(60):
                fz = torch.tanh(z @ self.W.T + self.x)
                J = (1 - fz**2).unsqueeze(2) * self.W
                z = z - torch.linalg.solve(eye - J, (z - fz).unsqueeze(2)).squeeze(2)
            return z


def fixed_fn(layer: TanhLayer, x):
    return lambda z: layer(z, x)
