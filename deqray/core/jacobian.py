"""Jacobian tools at an equilibrium: a Hutchinson estimate of ||J||_F^2 and the spectral radius.

Both work from `fz = f(z)` computed with autograd on and `z` requiring grad,
and use only vector-Jacobian products, so they cost a backward pass per
probe, never a dense Jacobian. f must not mix samples (no batch statistics),
since the probes of all samples travel in one product.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def jac_loss_estimate(
    fz: Tensor, z: Tensor, *, n_samples: int = 1, create_graph: bool = True
) -> Tensor:
    """(B,) unbiased estimates of ||J_f(z)||_F^2 per sample.

    Hutchinson: for eps ~ N(0, I), E ||eps^T J||^2 = trace(J J^T) = ||J||_F^2.
    With `create_graph=True` the estimate is differentiable with respect to
    f's parameters, so `weight * est.mean() / dim` can join a training loss
    (the Jacobian regularisation of Bai et al., ICML 2021).
    """
    if n_samples < 1:
        raise ValueError(f"jac_loss_estimate: n_samples must be >= 1, got {n_samples}")
    total = None
    for i in range(n_samples):
        eps = torch.randn_like(fz)
        (vjp,) = torch.autograd.grad(fz, z, eps, retain_graph=True, create_graph=create_graph)
        sq = _rows(vjp).pow(2).sum(1)
        total = sq if i == 0 else total + sq
    return total / n_samples


def spectral_radius(fz: Tensor, z: Tensor, *, n_iter: int = 30, seed: int | None = None) -> Tensor:
    """(B,) power-method estimate of rho(J_f(z)) per sample.

    Iterates v <- J^T v / ||J^T v|| (J^T has J's spectrum). The estimate is
    the geometric mean of the growth ||J^T v|| over the second half of the
    iterations: for a real dominant eigenvalue it equals |lambda_max| as the
    plain ratio does, and for a dominant complex pair (where the plain ratio
    oscillates) it still converges to the modulus.
    """
    if n_iter < 2:
        raise ValueError(f"spectral_radius: n_iter must be >= 2, got {n_iter}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=z.device).manual_seed(seed)
    v = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=gen)
    v = v / _rows(v).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    log_growth = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    counted = 0
    start = n_iter // 2
    for i in range(n_iter):
        (w,) = torch.autograd.grad(fz, z, v, retain_graph=True)
        norm = _rows(w).norm(dim=1)
        if i >= start:
            log_growth = log_growth + torch.log(norm.clamp_min(torch.finfo(z.dtype).tiny))
            counted += 1
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        v = w / safe.view(-1, *([1] * (w.dim() - 1)))
    return torch.exp(log_growth / counted).detach()


def frobenius_per_dim(est: Tensor, dim: int) -> Tensor:
    """Batch mean of a per-sample ||J||_F^2 estimate divided by the state size.

    This is the normalisation of the papers' Jacobian loss, which keeps its
    scale independent of width and batch size.
    """
    return est.mean() / max(int(dim), 1)


__all__ = ["jac_loss_estimate", "spectral_radius", "frobenius_per_dim"]
