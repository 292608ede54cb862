"""deqray.core: the equilibrium core in pure PyTorch (no Ray import).

Solvers (`anderson`, `broyden`, `fixed_point`, by name via `get_solver`),
gradients through the equilibrium (implicit, phantom, unrolled), Jacobian
tools (Hutchinson ||J||_F^2, spectral radius), weight norm computed once per
forward, variational dropout, and the `DEQ` module that joins them.
"""

from .deq import DEQ, DEQConfig, DEQInfo
from .grad import GRAD_MODES, BackwardStats, attach_implicit, phantom, unrolled
from .jacobian import frobenius_per_dim, jac_loss_estimate, spectral_radius
from .regularizers import (
    VariationalDropout,
    VariationalDropout2d,
    apply_weight_norm,
    dropout_scope,
    weight_norm_cache,
)
from .solvers import (
    SolverResult,
    anderson,
    available_solvers,
    broyden,
    fixed_point,
    get_solver,
    register_solver,
)

__all__ = [
    "DEQ",
    "DEQConfig",
    "DEQInfo",
    "GRAD_MODES",
    "BackwardStats",
    "SolverResult",
    "VariationalDropout",
    "VariationalDropout2d",
    "anderson",
    "apply_weight_norm",
    "attach_implicit",
    "available_solvers",
    "broyden",
    "dropout_scope",
    "fixed_point",
    "frobenius_per_dim",
    "get_solver",
    "jac_loss_estimate",
    "phantom",
    "register_solver",
    "spectral_radius",
    "unrolled",
    "weight_norm_cache",
]
