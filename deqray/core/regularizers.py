"""Weight normalisation computed once per DEQ forward, and variational (locked) dropout.

Weight norm uses PyTorch's own parametrisation
(`torch.nn.utils.parametrizations.weight_norm`). Left alone, a parametrised
weight is recomputed at every access, i.e. at every solver iteration;
`weight_norm_cache` computes each one once, with autograd, and every
iteration (and the backward) reuses it.

Variational dropout draws its mask once per DEQ forward and reuses it at
every iteration, so that f stays one fixed function while it is solved. The
masks live in a scope opened by `dropout_scope` (the DEQ module opens one per
forward), not on the module, so concurrent forwards do not share masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

WEIGHT_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
)


def apply_weight_norm(
    module: nn.Module,
    *,
    types: Sequence[type[nn.Module]] = WEIGHT_NORM_TYPES,
    name: str = "weight",
    dim: int = 0,
) -> nn.Module:
    """Weight-normalise `name` of every submodule of the given types (in place)."""
    for m in module.modules():
        if isinstance(m, tuple(types)) and not parametrize.is_parametrized(m, name):
            _torch_weight_norm(m, name=name, dim=dim)
    return module


def _parametrized(modules: Sequence[nn.Module]) -> Iterator[tuple[nn.Module, str]]:
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen or not parametrize.is_parametrized(m):
                continue
            seen.add(id(m))
            for name in m.parametrizations:
                yield m, name


@contextlib.contextmanager
def weight_norm_cache(*modules: nn.Module) -> Iterator[None]:
    """Within the block, every parametrised weight of `modules` is computed once.

    The weights are computed on entry, in the caller's grad mode, so a cache
    filled before a `torch.no_grad()` solver loop still carries the graph the
    backward needs.
    """
    with parametrize.cached():
        for m, name in _parametrized(modules):
            getattr(m, name)
        yield


_MASKS: ContextVar[dict | None] = ContextVar("deqray_dropout_masks", default=None)


@contextlib.contextmanager
def dropout_scope() -> Iterator[None]:
    """Variational dropout masks drawn inside the block are reused until it ends."""
    token = _MASKS.set({})
    try:
        yield
    finally:
        _MASKS.reset(token)


class VariationalDropout(nn.Module):
    """Dropout whose mask is shared along `shared_dims` and fixed within a dropout scope.

    `shared_dims` are the dimensions the mask is broadcast over: the sequence
    axis for a (B, L, D) hidden state (`shared_dims=(1,)`), the spatial axes
    for (B, C, H, W) feature maps (`(2, 3)`, see `VariationalDropout2d`).
    Outside a scope each call draws a fresh mask, like ordinary dropout.
    """

    def __init__(self, p: float = 0.0, shared_dims: Sequence[int] = (1,)):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def _mask(self, x: Tensor) -> Tensor:
        shape = list(x.shape)
        for d in self.shared_dims:
            if not -x.dim() <= d < x.dim():
                raise ValueError(
                    f"VariationalDropout: shared dim {d} out of range for a {x.dim()}-d input"
                )
            shape[d] = 1
        keep = 1.0 - self.p
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep) / keep

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        masks = _MASKS.get()
        if masks is None:
            return x * self._mask(x)
        key = (id(self), tuple(x.shape), x.dtype, x.device)
        mask = masks.get(key)
        if mask is None:
            mask = masks[key] = self._mask(x)
        return x * mask


class VariationalDropout2d(VariationalDropout):
    """Channel dropout for (B, C, H, W) maps, one mask per sample and channel."""

    def __init__(self, p: float = 0.0):
        super().__init__(p, shared_dims=(2, 3))
