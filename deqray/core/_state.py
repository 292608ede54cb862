"""Mapping between a model's equilibrium state and the (batch, dim) matrix solvers work on.

A state is a tensor whose first dimension is the batch, or a list/tuple of such
tensors (one per resolution in a multiscale model). Solvers never see the
structure: they iterate on one matrix with a row per sample, so that every
per-sample quantity (residual, convergence, Anderson/Broyden history) is a
row-wise operation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

State = Tensor | Sequence[Tensor]


class StateSpec:
    """Shapes of a state, and the flatten/unflatten pair for it."""

    def __init__(self, state: State):
        self.is_sequence = isinstance(state, (list, tuple))
        tensors = list(state) if self.is_sequence else [state]
        if not tensors:
            raise ValueError(
                "an equilibrium state must hold at least one tensor, got an empty list"
            )
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"state element {i} is {type(t).__name__}, expected a torch.Tensor")
            if t.dim() < 1:
                raise ValueError(
                    f"state element {i} is a scalar; states need a leading batch dimension"
                )
        batch = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if t.shape[0] != batch:
                raise ValueError(
                    f"state element {i} has batch size {t.shape[0]}, element 0 has {batch}"
                )
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(f"state tensors must share one dtype, got {sorted(map(str, dtypes))}")
        self.batch = batch
        self.shapes = [tuple(t.shape) for t in tensors]
        self.sizes = [int(torch.Size(s[1:]).numel()) for s in self.shapes]
        self.dim = sum(self.sizes)
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device

    def flatten(self, state: State) -> Tensor:
        if not self.is_sequence:
            return state.reshape(self.batch, self.dim)
        if len(state) != len(self.shapes):
            raise ValueError(
                f"f returned {len(state)} state tensors, the initial state has {len(self.shapes)}"
            )
        return torch.cat([t.reshape(self.batch, -1) for t in state], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        if not self.is_sequence:
            return flat.reshape(self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(s) for p, s in zip(parts, self.shapes, strict=True)]

    def check_output(self, out: State) -> None:
        """Raise a clear error when f changes the state's structure."""
        seq = isinstance(out, (list, tuple))
        if seq != self.is_sequence:
            kind = "a list of tensors" if self.is_sequence else "a tensor"
            raise TypeError(f"f must return {kind} like its input state, got {type(out).__name__}")
        outs = list(out) if seq else [out]
        if len(outs) != len(self.shapes):
            raise ValueError(
                f"f returned {len(outs)} state tensors, the state has {len(self.shapes)}"
            )
        for i, (t, s) in enumerate(zip(outs, self.shapes, strict=True)):
            if not isinstance(t, Tensor):
                raise TypeError(f"f returned {type(t).__name__} as state element {i}")
            if tuple(t.shape) != s:
                raise ValueError(f"f changed state element {i} from shape {s} to {tuple(t.shape)}")


def flat_function(f, spec: StateSpec, *, checked: bool = True):
    """Wrap f (state -> state) as a function on the flattened (batch, dim) matrix.

    The first call checks that f keeps the state's structure, so a shape bug in
    a model is reported in terms of the model's state, not of the flat matrix.
    """
    first = [checked]

    def flat_f(z: Tensor) -> Tensor:
        out = f(spec.unflatten(z))
        if first[0]:
            spec.check_output(out)
            first[0] = False
        # the solver iterates in the state's dtype, whatever precision f ran in
        return spec.flatten(out).to(spec.dtype)

    return flat_f
