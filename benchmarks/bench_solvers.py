"""deqray's solvers and implicit gradient against their physical limit and torchdeq, in one run.

    pip install -e ".[bench]"
    python benchmarks/bench_solvers.py --threads 1 2 --out benchmarks/results/solvers.json

Problems (float32, batch 32, width 512; see deqray.core.problems):
  contractive  f(z) = tanh(W z + U x), rho(W) = 0.8
  hard         the same layer with W scaled so that max_b rho(J_f(z*_b)) = 0.98
               (Newton fixed points, dense eigenvalues); Picard needs ~300 steps

For every solver: evaluations of f (NFE) and wall time until every sample has
relative residual <= 1e-4 (checked again on the returned state, not taken
from the solver's own report). The limit of a solve is NFE x t_f: every
solve is followed by NFE evaluations z <- f(z) timed the same way, and
`ratio` is the median over repeats of wall / limit, so 1.0 means the solver
itself costs nothing. The implicit backward is measured the same way: its
time against NFE vector-Jacobian products and one backward through f (the
final pass to x and the weights), run on the same graph right after it.
`--baseline-core DIR` runs another version's solvers side by side in the
same process (e.g. DIR = the deqray/core of `git worktree add /tmp/base HEAD`).
For the gradient: d(sum w * z*)/dx from each library's DEQ against the exact
gradient, solved densely from (I - J)^T at the Newton fixed point in float64.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import deqray.core as deqray_core
from deqray.core import DEQ, anderson, broyden, fixed_point
from deqray.core.problems import tanh_problem

TOL = 1e-4
MAX_ITER = 300


class Counted:
    """f with a call counter (nothing else: the solve is timed as a whole)."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def chain(f, z0, n):
    """Seconds of n evaluations z <- f(z): the limit of a solve with NFE n, measured as
    a solve would use f (each call on the previous output, outputs freed as they go)."""
    t = time.perf_counter()
    z = z0
    for _ in range(n):
        z = f(z)
    return time.perf_counter() - t


def load_baseline(path):
    """Another version of deqray.core (e.g. from `git worktree add /tmp/base HEAD`), imported
    under its own name so that both run side by side in this process."""
    import importlib.util
    import sys

    path = Path(path)
    if not (path / "__init__.py").exists() or not (path / "solvers.py").exists():
        raise SystemExit(f"--baseline-core {path}: not a deqray/core directory")
    spec = importlib.util.spec_from_file_location(
        "deqray_core_baseline", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def rel_residual(layer, x, z):
    """max over the batch of the relative residual, recomputed in float64."""
    layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        fz = layer(z.double(), x.double())
        return ((fz - z.double()).norm(dim=1) / (fz.norm(dim=1) + 1e-9)).max().item()


def ours(name, solver, tag="", **opts):
    def run(f, z0):
        return solver(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel", **opts).result

    return f"deqray{'@' + tag if tag else ''} {name}", run


def theirs(name):
    from torchdeq.solver import get_solver

    solver = get_solver(name)

    def run(f, z0):
        z, _, _ = solver(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")
        return z

    return f"torchdeq {name}", run


def solver_rows(nt, pname, layer, x, entries, repeats):
    """Each solve is followed by a chain of as many evaluations of f, so that the limit is
    measured next to the solve it bounds (and drifts of the machine cancel in the ratio)."""
    z0 = torch.zeros_like(x)

    def f(z):
        return layer(z, x)

    rows = []
    for label, run in entries:
        walls, limits, ratios, nfes = [], [], [], []
        z = None
        with torch.no_grad():
            for rep in range(repeats + 1):  # the first run warms up
                counted = Counted(f)
                t = time.perf_counter()
                z = run(counted, z0)
                wall = time.perf_counter() - t
                limit = chain(f, z0, counted.calls)
                if rep:
                    walls.append(wall)
                    limits.append(limit)
                    ratios.append(wall / limit)
                    nfes.append(counted.calls)
        res = rel_residual(layer, x, z)
        wall, nfe = statistics.median(walls), int(statistics.median(nfes))
        t_f = statistics.median(limits) / nfe
        rows.append(
            dict(
                threads=nt,
                problem=pname,
                solver=label,
                nfe=nfe,
                wall_ms=wall * 1e3,
                t_f_ms=t_f * 1e3,
                ratio=statistics.median(ratios),
                max_rel_residual=res,
                reached=res <= TOL * 1.0001,
            )
        )
        r = rows[-1]
        print(
            f"threads={nt} {pname:11s} {label:30s} nfe={nfe:4d} wall={r['wall_ms']:8.2f}ms "
            f"t_f={r['t_f_ms']:.3f}ms ratio={r['ratio']:5.2f}x "
            f"max_rel_res={res:.2e} {'ok' if r['reached'] else 'NOT REACHED'}",
            flush=True,
        )
    return rows


def backward_rows(nt, pname, layer, x, repeats, libraries):
    """The implicit backward alone (hook solve + final pass to x and W), each run followed
    by its limit: NFE vector-Jacobian products and one backward through f."""
    with torch.no_grad():
        z_star = anderson(lambda z: layer(z, x), torch.zeros_like(x), max_iter=MAX_ITER, tol=TOL)
    z_star = z_star.result
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    rows = []
    for lib_name, lib in libraries:
        for solver in ("anderson", "broyden"):
            walls, ratios, nfe, t_vjp = [], [], 0, []
            for rep in range(repeats + 1):
                xr = x.clone().requires_grad_()
                z_in = z_star.detach().requires_grad_()
                fz = layer(z_in, xr)
                out = lib.attach_implicit(fz, z_in, solver=solver, max_iter=150, tol=1e-5)
                t = time.perf_counter()
                torch.autograd.grad(out, [xr, layer.lin.weight], v, retain_graph=True)
                wall = time.perf_counter() - t
                nfe = out.backward_stats.result.nfe
                # the limit, on the same graph: NFE products u -> J^T u, one final pass
                t = time.perf_counter()
                u = v
                for _ in range(nfe):
                    (u,) = torch.autograd.grad(fz, z_in, u, retain_graph=True)
                torch.autograd.grad(fz, [xr, layer.lin.weight], v, retain_graph=True)
                limit = time.perf_counter() - t
                if rep:
                    walls.append(wall)
                    ratios.append(wall / limit)
                    t_vjp.append(limit / (nfe + 1))
            wall = statistics.median(walls)
            ratio = statistics.median(ratios)
            rows.append(
                dict(
                    threads=nt,
                    problem=pname,
                    solver=f"{lib_name} implicit backward ({solver})",
                    nfe=nfe,
                    wall_ms=wall * 1e3,
                    t_vjp_ms=statistics.median(t_vjp) * 1e3,
                    ratio=ratio,
                )
            )
            print(
                f"threads={nt} {pname:11s} {lib_name} backward {solver:9s} nfe={nfe:4d} "
                f"wall={wall * 1e3:8.2f}ms ratio={ratio:5.2f}x",
                flush=True,
            )
    return rows


def solver_table(problems, threads, repeats, baseline=None):
    entries = [
        ours("anderson", anderson),
        ours("anderson m=10", anderson, m=10),
        ours("broyden", broyden),
        ours("broyden memory=12", broyden, memory=12),
        ours("broyden restart", broyden, memory_policy="restart"),
        ours("fixed_point", fixed_point),
    ]
    libraries = [("deqray", deqray_core)]
    if baseline is not None:
        entries += [
            ours("anderson", baseline.anderson, tag="baseline"),
            ours("broyden", baseline.broyden, tag="baseline"),
            ours("fixed_point", baseline.fixed_point, tag="baseline"),
        ]
        libraries.append(("baseline", baseline))
    try:
        entries += [theirs("anderson"), theirs("broyden"), theirs("fixed_point_iter")]
    except ImportError:
        print("torchdeq is not installed (pip install -e '.[bench]'): deqray only")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for pname, (layer, x) in problems.items():
            rows += solver_rows(nt, pname, layer, x, entries, repeats)
            rows += backward_rows(nt, pname, layer, x, repeats, libraries)
    return rows


def exact_grad(layer, x, w):
    """d(sum w*z*)/dx by a dense solve of (I - J)^T u = w at the Newton fixed point."""
    L = copy.deepcopy(layer).double()
    xd, wd = x.double(), w.double()
    z = L.newton_fixed_point(xd)
    J = L.jacobian(z, xd)
    eye = torch.eye(J.shape[1], dtype=J.dtype)
    u = torch.linalg.solve((eye - J).transpose(1, 2), wd.unsqueeze(2)).squeeze(2)
    xr = xd.clone().requires_grad_()
    (gx,) = torch.autograd.grad(L(z, xr), xr, u)
    return gx


def ours_grad(layer, x, w, z0, **cfg):
    deq = DEQ(layer, **cfg)
    xr = x.clone().requires_grad_()
    z, info = deq(xr, z0)
    (gx,) = torch.autograd.grad((z * w).sum(), xr)
    m = info.metrics()
    return gx, dict(bwd_nstep=m.get("bwd_nstep"), bwd_converged=m.get("bwd_converged"))


def theirs_grad(layer, x, w, z0, **kw):
    from torchdeq import get_deq

    deq = get_deq(f_solver="anderson", f_max_iter=MAX_ITER, f_tol=TOL, f_stop_mode="rel", **kw)
    xr = x.clone().requires_grad_()
    zs, _ = deq(lambda z: layer(z, xr), z0)
    (gx,) = torch.autograd.grad((zs[-1] * w).sum(), xr)
    return gx, {}


def grad_table(problems, exact_grads, threads):
    torch.set_num_threads(max(threads))
    methods = [
        (
            "deqray: forward to 1e-4, backward at defaults",
            ours_grad,
            dict(f_thres=MAX_ITER, f_tol=TOL),
        ),
        ("deqray: all defaults", ours_grad, {}),
    ]
    try:
        import torchdeq  # noqa: F401

        methods += [
            ("torchdeq: forward to 1e-4, ift=True, backward defaults", theirs_grad, dict(ift=True)),
            ("torchdeq: forward to 1e-4, defaults (1-step gradient)", theirs_grad, {}),
        ]
    except ImportError:
        pass
    rows = []
    for pname, (layer, x) in problems.items():
        w, exact = exact_grads[pname]
        z0 = torch.zeros_like(x)
        for label, fn, kw in methods:
            t = time.perf_counter()
            gx, extra = fn(layer, x, w, z0, **kw)
            sec = time.perf_counter() - t
            err = ((gx.double() - exact).norm() / exact.norm()).item()
            rows.append(dict(problem=pname, method=label, rel_error=err, seconds=sec, **extra))
            print(
                f"grad {pname:11s} {label:52s} rel_error={err:.2e} ({sec * 1e3:.0f} ms)", flush=True
            )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--no-grad-table", action="store_true", help="skip the gradient-error table")
    ap.add_argument(
        "--baseline-core",
        default=None,
        help="a deqray/core directory of another version, run side by side (before/after)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--cache",
        default="benchmarks/.cache",
        help="where the calibrated problems are kept between runs",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    t = time.perf_counter()
    cache = Path(args.cache) / f"problems_b{args.batch}_w{args.width}.pt"
    if cache.exists():
        problems = torch.load(cache, weights_only=False)
    else:
        problems = {
            "contractive": tanh_problem(
                args.batch, args.width, rho=0.8, seed=0, calibrate=False, dtype=torch.float32
            ),
            "hard": tanh_problem(
                args.batch, args.width, rho=0.98, seed=1, x_scale=0.1, dtype=torch.float32
            ),
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(problems, cache)
    # Dense references first: with torch 2.14.1 + MKL, batched LU of 512x512
    # matrices fails ("DLASWP parameter 6") once the thread count has been
    # changed from 1 back to 2 in the process.
    exact_grads = {}
    if not args.no_grad_table:
        for pname, (layer, x) in problems.items():
            w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
            exact_grads[pname] = (w, exact_grad(layer, x, w))
    print(f"problems and references built in {time.perf_counter() - t:.0f}s", flush=True)
    baseline = load_baseline(args.baseline_core) if args.baseline_core else None
    solvers = solver_table(problems, args.threads, args.repeats, baseline)
    grads = [] if args.no_grad_table else grad_table(problems, exact_grads, args.threads)
    report = dict(
        date=str(date.today()),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads max, "
        f"torch {torch.__version__}",
        batch=args.batch,
        width=args.width,
        tol=TOL,
        solvers=solvers,
        gradients=grads,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
