"""The DEQ module: solve z* = f(z*, x), differentiate through it, report on it.

    deq = DEQ(f, f_solver="anderson", f_thres=30, grad="implicit")
    z_star, info = deq(x, z0)
    loss = criterion(head(z_star)) + 0.1 * info.jac_loss   # if jac_loss=True was asked
    loss.backward()
    info.metrics()     # forward steps, residuals, converged fraction, backward stats

`f` is an nn.Module called as f(z, x) with z a tensor or a list of tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import suggest
from ._state import State, StateSpec, flat_function
from .grad import GRAD_MODES, BackwardStats, attach_implicit, phantom, unrolled
from .jacobian import frobenius_per_dim, jac_loss_estimate, spectral_radius
from .regularizers import dropout_scope, weight_norm_cache
from .solvers import STOP_MODES, SolverResult, check_snapshots, get_solver, no_autocast


@dataclass
class DEQConfig:
    """How a DEQ solves and differentiates. Field names follow the DEQ papers' code."""

    f_solver: str = "anderson"  # forward solver (a registered name)
    f_thres: int = 40  # forward iteration budget in training
    f_thres_jitter: int = 0  # in training, each forward draws f_thres +- this (uniform)
    eval_f_thres: int | None = None  # budget in eval mode (None: f_thres)
    f_tol: float = 1e-4
    f_stop_mode: str = "rel"
    f_solver_options: dict = field(default_factory=dict)
    b_solver: str = "anderson"  # backward (implicit) solver
    # Generous on purpose: solves stop per sample at b_tol, so the budget costs
    # only where it is needed. With spectral radius 0.98 the backward system
    # takes ~100-150 steps; a budget of 30 leaves a 13% gradient error there.
    b_thres: int = 150
    b_tol: float = 1e-5
    # "abs" backward tolerances scale with the loss (its gradient shrinks with
    # the batch size); "rel" does not, hence the default.
    b_stop_mode: str = "rel"
    b_solver_options: dict = field(default_factory=dict)
    grad: str = "implicit"  # implicit | phantom | unrolled
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    pretrain_layers: int = 2  # depth of the weight-tied network in pretrain mode
    jac_samples: int = 1  # Hutchinson probes for the Jacobian loss
    sradius_iters: int = 50  # power-method iterations for the spectral radius

    @classmethod
    def build(
        cls, config: DEQConfig | dict | None = None, where: str = "DEQ config", **overrides
    ) -> DEQConfig:
        """A validated config from a DEQConfig, a mapping, and keyword overrides."""
        if isinstance(config, DEQConfig):
            base = dataclasses.asdict(config)
        elif config is None:
            base = {}
        elif isinstance(config, dict):
            base = dict(config)
        else:
            raise TypeError(f"{where}: expected a DEQConfig or a dict, got {type(config).__name__}")
        base.update(overrides)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in base:
            if key not in names:
                raise ValueError(
                    f"{where}: unknown key {key!r}{suggest(key, names)}; "
                    f"valid keys: {', '.join(names)}"
                )
        hints = typing.get_type_hints(cls)
        for key, value in base.items():
            _check_type(where, key, value, hints[key])
        cfg = cls(**base)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "DEQ config") -> None:
        for key in ("f_solver", "b_solver"):
            try:
                get_solver(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"{where}: {key}: {e}") from None
        for key in ("f_stop_mode", "b_stop_mode"):
            if getattr(self, key) not in STOP_MODES:
                raise ValueError(
                    f"{where}: {key} must be one of {STOP_MODES}, got {getattr(self, key)!r}"
                )
        if self.grad not in GRAD_MODES:
            raise ValueError(
                f"{where}: grad must be one of {GRAD_MODES}, got {self.grad!r}"
                f"{suggest(str(self.grad), GRAD_MODES)}"
            )
        for key in ("f_thres", "b_thres", "phantom_steps", "jac_samples", "pretrain_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.sradius_iters < 2:
            raise ValueError(f"{where}: sradius_iters must be >= 2, got {self.sradius_iters}")
        if self.f_thres_jitter < 0 or self.f_thres_jitter >= self.f_thres:
            raise ValueError(
                f"{where}: f_thres_jitter must be in [0, f_thres), got {self.f_thres_jitter}"
            )
        if self.eval_f_thres is not None and self.eval_f_thres < 1:
            raise ValueError(f"{where}: eval_f_thres must be >= 1, got {self.eval_f_thres}")
        for key in ("f_tol", "b_tol"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{where}: {key} must be > 0, got {getattr(self, key)}")
        if not 0 < self.phantom_damping <= 1:
            raise ValueError(
                f"{where}: phantom_damping must be in (0, 1], got {self.phantom_damping}"
            )


def _active_autocast() -> tuple[str, torch.dtype] | None:
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return device, torch.get_autocast_dtype(device)
    return None


def _check_type(where: str, key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
    else:
        options = (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return
        base = typing.get_origin(opt) or opt
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if base not in (int, float) and isinstance(value, base):
            return
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise TypeError(f"{where}: {key} must be {names}, got {value!r} ({type(value).__name__})")


@dataclass
class DEQInfo:
    """What one DEQ forward did. Tensors are per sample; `metrics()` gives floats."""

    mode: str  # "deq" or "pretrain"
    nstep: Tensor  # (B,) forward steps of the returned iterate (layers in pretrain)
    # residuals of the returned iterate; in pretrain mode, of the last layer's
    # input (the change that layer made), which costs no extra evaluation
    abs_residual: Tensor
    rel_residual: Tensor
    converged: Tensor  # (B,) bool (in pretrain: rel residual <= f_tol)
    nfe: int
    forward: SolverResult | None = None
    backward: BackwardStats = field(default_factory=BackwardStats)
    jac_loss: Tensor | None = None  # differentiable: mean ||J||_F^2 / dim
    sradius: Tensor | None = None  # (B,) spectral radius of J at the equilibrium
    # {k: the forward solve as it stood after k steps}, for the steps asked of
    # forward(snapshots=...): each equals the solve of a call with f_thres=k
    snapshots: dict[int, SolverResult] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {
            "fwd_nstep": float(self.nstep.float().mean()),
            "fwd_nstep_max": float(self.nstep.max()),
            "fwd_abs_residual": float(self.abs_residual.float().mean()),
            "fwd_rel_residual": float(self.rel_residual.float().mean()),
            "fwd_rel_residual_max": float(self.rel_residual.float().max()),
            "fwd_converged": float(self.converged.float().mean()),
            "fwd_nfe": float(self.nfe),
        }
        if self.forward is not None:
            out["fwd_nonfinite"] = float(self.forward.nonfinite.float().mean())
        if self.jac_loss is not None:
            out["jac_loss"] = float(self.jac_loss.detach())
        if self.sradius is not None:
            out["sradius"] = float(self.sradius.float().mean())
            out["sradius_max"] = float(self.sradius.float().max())
        if self.backward.result is not None:
            r = self.backward.result
            out["bwd_nstep"] = float(r.nstep.float().mean())
            out["bwd_rel_residual"] = float(r.rel_residual.float().mean())
            out["bwd_rel_residual_max"] = float(r.rel_residual.float().max())
            out["bwd_converged"] = float(r.converged.float().mean())
            out["bwd_nfe"] = float(r.nfe)
        return out


class DEQ(nn.Module):
    """A deep equilibrium layer around `f(z, x)`.

    forward(x, z0=None, *, pretrain=False, f_thres=None, jac_loss=False,
            sradius=False, snapshots=None) -> (z, DEQInfo)

    * `z0`: the initial state (tensor or list of tensors); when None, f must
      offer `init_state(x)`.
    * `pretrain=True`: f applied `pretrain_layers` times with ordinary
      backprop (the weight-tied network used in the first training steps).
    * `f_thres`: this call's iteration budget; otherwise `f_thres` in
      training (drawn from f_thres +- f_thres_jitter when the jitter is set)
      and `eval_f_thres` in eval mode.
    * `jac_loss=True`: `info.jac_loss` holds the Hutchinson estimate of
      ||J||_F^2 / dim at the equilibrium, differentiable.
    * `sradius=True`: `info.sradius` holds the power-method spectral radius.
    * `snapshots=(2, 4, 8)`: `info.snapshots[k]` is the forward solve after k
      steps (a SolverResult: `.result` the state, `.nstep`, residuals,
      `.converged` per sample), equal to the solve of a call with
      `f_thres=k`, all from this one solve. Without autograd (eval) a call
      returns z* itself, so `info.snapshots[k].result` is then exactly what
      that call would return; with autograd on it returns f(z*) (the
      implicit gradient's hook), which snapshots do not carry. Steps must not
      exceed this call's budget; not available in pretrain mode.

    Weight-normalised weights in f are computed once per call and variational
    dropout masks drawn once per call (see `regularizers`).
    """

    def __init__(self, f: nn.Module, config: DEQConfig | dict | None = None, **overrides):
        super().__init__()
        self.f = f
        self.config = DEQConfig.build(config, **overrides)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"f_solver={c.f_solver}, f_thres={c.f_thres}, b_solver={c.b_solver}, "
            f"b_thres={c.b_thres}, grad={c.grad}"
        )

    def forward(
        self,
        x: Any,
        z0: State | None = None,
        *,
        pretrain: bool = False,
        f_thres: int | None = None,
        jac_loss: bool = False,
        sradius: bool = False,
        snapshots: typing.Iterable[int] | None = None,
    ) -> tuple[State, DEQInfo]:
        if pretrain and snapshots:
            raise ValueError(
                "DEQ: snapshots are steps of the forward solve; pretrain mode has none"
            )
        if z0 is None:
            init = getattr(self.f, "init_state", None)
            if init is None:
                raise ValueError("DEQ: pass z0, or give f an init_state(x) method")
            z0 = init(x)
        # Under autocast, only f runs in reduced precision: the solvers, the
        # implicit backward and the Jacobian tools work in the state's dtype
        # (a bf16 Gram matrix or residual would end the solve early or wrong).
        amp = _active_autocast()

        def call_f(z: State) -> State:  # f at the caller's autocast setting
            if amp is None:
                return self.f(z, x)
            with torch.autocast(amp[0], dtype=amp[1]):
                return self.f(z, x)

        with weight_norm_cache(self.f), dropout_scope(), no_autocast():
            if pretrain:
                return self._pretrain(call_f, z0, jac_loss, sradius)
            return self._solve(call_f, z0, f_thres, jac_loss, sradius, snapshots)

    # ------------------------------------------------------------------ modes

    def _pretrain(self, call_f, z0, want_jac, want_sr):
        cfg = self.config
        z = z0
        for _ in range(cfg.pretrain_layers - 1):
            z = call_f(z)
        spec = StateSpec(z0)
        ff = flat_function(call_f, spec)
        z_last = spec.flatten(z)
        need_graph = want_jac or want_sr
        if need_graph and not z_last.requires_grad:
            z_last = z_last.detach().requires_grad_()
        with torch.enable_grad() if need_graph else contextlib.nullcontext():
            fz = ff(z_last)
        g = (fz - z_last).detach()
        abs_res = torch.linalg.vector_norm(g, dim=1)
        rel_res = abs_res / (torch.linalg.vector_norm(fz.detach(), dim=1) + 1e-9)
        info = DEQInfo(
            mode="pretrain",
            nstep=torch.full((spec.batch,), cfg.pretrain_layers, device=fz.device),
            abs_residual=abs_res,
            rel_residual=rel_res,
            converged=rel_res <= cfg.f_tol,
            nfe=cfg.pretrain_layers,
        )
        self._jacobian_terms(info, fz, z_last, spec.dim, want_jac, want_sr)
        return spec.unflatten(fz), info

    def _solve(self, call_f, z0, f_thres, want_jac, want_sr, snapshots=None):
        cfg = self.config
        spec = StateSpec(z0)
        ff = flat_function(call_f, spec)
        if f_thres is None:
            if self.training:
                f_thres = cfg.f_thres
                if cfg.f_thres_jitter:  # torch's RNG, so that seeds reproduce it
                    j = cfg.f_thres_jitter
                    f_thres += int(torch.randint(-j, j + 1, ()))
            else:
                f_thres = cfg.f_thres if cfg.eval_f_thres is None else cfg.eval_f_thres
        solver_kwargs = dict(max_iter=int(f_thres), tol=cfg.f_tol, stop_mode=cfg.f_stop_mode)
        if snapshots:
            solver_kwargs["snapshots"] = check_snapshots(snapshots, int(f_thres), "DEQ forward")
        need_grad = torch.is_grad_enabled()
        z0_flat = spec.flatten(z0)

        if cfg.grad == "unrolled" and need_grad:
            res = unrolled(ff, z0_flat, **solver_kwargs)
            info = self._info(res, spec)
            out = res.flat
            if want_jac or want_sr:
                z_in = out.detach().requires_grad_()
                self._jacobian_terms(info, ff(z_in), z_in, spec.dim, want_jac, want_sr)
            return spec.unflatten(out), info

        with torch.no_grad():
            res = get_solver(cfg.f_solver)(
                ff, z0_flat.detach(), **solver_kwargs, **cfg.f_solver_options
            )
        info = self._info(res, spec)
        z_star = res.flat
        if not need_grad:
            if want_sr:
                with torch.enable_grad():
                    z_in = z_star.detach().requires_grad_()
                    self._jacobian_terms(info, ff(z_in), z_in, spec.dim, False, True)
            return spec.unflatten(z_star), info

        if cfg.grad == "implicit":
            z_in = z_star.detach().requires_grad_()
            fz = ff(z_in)
            # The Jacobian terms share this f evaluation with the implicit backward.
            self._jacobian_terms(info, fz, z_in, spec.dim, want_jac, want_sr)
            out = attach_implicit(
                fz,
                z_in,
                solver=cfg.b_solver,
                max_iter=cfg.b_thres,
                tol=cfg.b_tol,
                stop_mode=cfg.b_stop_mode,
                solver_options=cfg.b_solver_options,
                stats=info.backward,
            )
        else:  # phantom
            out = phantom(ff, z_star, steps=cfg.phantom_steps, damping=cfg.phantom_damping)
            if want_jac or want_sr:
                z_in = z_star.detach().requires_grad_()
                self._jacobian_terms(info, ff(z_in), z_in, spec.dim, want_jac, want_sr)
        return spec.unflatten(out), info

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _info(res: SolverResult, spec: StateSpec) -> DEQInfo:
        # the solvers saw the flattened state; snapshots hand back the model's
        snapshots = {
            k: dataclasses.replace(r, result=spec.unflatten(r.flat))
            for k, r in getattr(res, "snapshots", {}).items()  # (a user solver may have none)
        }
        return DEQInfo(
            mode="deq",
            nstep=res.nstep,
            abs_residual=res.abs_residual,
            rel_residual=res.rel_residual,
            converged=res.converged,
            nfe=res.nfe,
            forward=res,
            snapshots=snapshots,
        )

    def _jacobian_terms(self, info, fz, z_in, dim, want_jac, want_sr):
        cfg = self.config
        if want_jac:
            est = jac_loss_estimate(fz, z_in, n_samples=cfg.jac_samples, create_graph=True)
            info.jac_loss = frobenius_per_dim(est, dim)
        if want_sr:
            info.sradius = spectral_radius(fz, z_in, n_iter=cfg.sradius_iters)
