"""deqray's solvers and implicit gradient side by side with torchdeq's, in one run.

    pip install -e ".[bench]"
    python benchmarks/bench_solvers.py --threads 1 2 --out benchmarks/results/solvers.json

Problems (float32, batch 32, width 512; see deqray.core.problems):
  contractive  f(z) = tanh(W z + U x), rho(W) = 0.8
  hard         the same layer with W scaled so that max_b rho(J_f(z*_b)) = 0.98
               (Newton fixed points, dense eigenvalues); Picard needs ~300 steps

For every solver: evaluations of f and wall time until every sample has
relative residual <= 1e-4 (checked again on the returned state, not taken
from the solver's own report), and the share of the time spent outside f.
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

from deqray.core import DEQ, anderson, broyden, fixed_point
from deqray.core.problems import tanh_problem

TOL = 1e-4
MAX_ITER = 300


class Timed:
    """f with a stopwatch: calls and seconds spent inside f (CPU work is synchronous)."""

    def __init__(self, f):
        self.f, self.calls, self.seconds = f, 0, 0.0

    def __call__(self, z):
        t = time.perf_counter()
        out = self.f(z)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def rel_residual(layer, x, z):
    """max over the batch of the relative residual, recomputed in float64."""
    layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        fz = layer(z.double(), x.double())
        return ((fz - z.double()).norm(dim=1) / (fz.norm(dim=1) + 1e-9)).max().item()


def ours(name, solver, **opts):
    def run(f, z0):
        return solver(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel", **opts).result

    return f"deqray {name}", run


def theirs(name):
    from torchdeq.solver import get_solver

    solver = get_solver(name)

    def run(f, z0):
        z, _, _ = solver(f, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")
        return z

    return f"torchdeq {name}", run


def solver_table(problems, threads, repeats):
    entries = [
        ours("anderson", anderson),
        ours("anderson m=10", anderson, m=10),
        ours("broyden", broyden),
        ours("fixed_point", fixed_point),
    ]
    try:
        entries += [theirs("anderson"), theirs("broyden"), theirs("fixed_point_iter")]
    except ImportError:
        print("torchdeq is not installed (pip install -e '.[bench]'): deqray only")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for pname, (layer, x) in problems.items():
            z0 = torch.zeros_like(x)
            for label, run in entries:
                walls, fsecs, nfes = [], [], []
                z = None
                with torch.no_grad():
                    for rep in range(repeats + 1):  # the first run warms up
                        f = Timed(lambda z, x=x, layer=layer: layer(z, x))
                        t = time.perf_counter()
                        z = run(f, z0)
                        wall = time.perf_counter() - t
                        if rep:
                            walls.append(wall)
                            fsecs.append(f.seconds)
                            nfes.append(f.calls)
                res = rel_residual(layer, x, z)
                wall = statistics.median(walls)
                fsec = statistics.median(fsecs)
                rows.append(
                    dict(
                        threads=nt,
                        problem=pname,
                        solver=label,
                        nfe=int(statistics.median(nfes)),
                        wall_ms=wall * 1e3,
                        f_ms=fsec * 1e3,
                        overhead=1 - fsec / wall,
                        max_rel_residual=res,
                        reached=res <= TOL * 1.0001,
                    )
                )
                r = rows[-1]
                print(
                    f"threads={nt} {pname:11s} {label:24s} nfe={r['nfe']:4d} "
                    f"wall={r['wall_ms']:8.2f}ms overhead={r['overhead']:6.1%} "
                    f"max_rel_res={res:.2e} {'ok' if r['reached'] else 'NOT REACHED'}",
                    flush=True,
                )
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
    for pname, (layer, x) in problems.items():
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        exact_grads[pname] = (w, exact_grad(layer, x, w))
    print(f"problems and references built in {time.perf_counter() - t:.0f}s", flush=True)
    solvers = solver_table(problems, args.threads, args.repeats)
    grads = grad_table(problems, exact_grads, args.threads)
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
