"""GPU checks of deqray.core: no per-iteration host sync, correctness on CUDA, timings.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out results.json]

1. Host synchronisations during a solve, counted with
   torch.cuda.set_sync_debug_mode("warn"): must not grow with the number of
   iterations (the stopping test is read back through pinned memory).
2. Per-sample convergence on CUDA (float32, float64) against a float64 CPU
   Newton fixed point; implicit gradient against a dense solve, on CUDA.
3. Wall time to every sample at rel. residual 1e-4, deqray vs torchdeq (when
   importable), with the share of time outside f (f timed alone, synchronised).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from deqray.core import DEQ, anderson, broyden, fixed_point
from deqray.core.problems import tanh_problem

SOLVERS = {"anderson": anderson, "broyden": broyden, "fixed_point": fixed_point}


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sync_check(layer, x):
    """Host syncs of a solve (and of a DEQ training step) at 10 and at 30 iterations."""
    out = {}
    z0 = torch.zeros_like(x)

    def solve(solver, n, **opts):
        return lambda: solver(lambda z: layer(z, x), z0, max_iter=n, tol=1e-30, **opts)

    def deq_step(n):
        def run():
            deq = DEQ(layer, f_thres=n, f_tol=1e-30, b_thres=n, b_tol=1e-30)
            xr = x.clone().requires_grad_()
            z, _ = deq(xr, z0)
            z.sum().backward()

        return run

    cases = {name: (lambda n, s=s: solve(s, n)) for name, s in SOLVERS.items()}
    # broyden with memory above the steps: no rank reduction (its QR/SVD sync)
    cases["broyden"] = lambda n: solve(broyden, n, memory=100)
    cases["DEQ forward+backward"] = deq_step
    for name, make in cases.items():
        counts = [count_syncs(make(n)) for n in (10, 30)]
        out[name] = dict(
            syncs_10_iters=counts[0],
            syncs_30_iters=counts[1],
            independent_of_iterations=counts[0] == counts[1],
        )
        print(
            f"sync {name:22s} 10 iters: {counts[0]} syncs, 30 iters: {counts[1]} syncs", flush=True
        )
    return out


def correctness(layer64, x64):
    z_ref = layer64.newton_fixed_point(x64)
    out = {}
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-4)):
        layer = tanh_like(layer64, dtype)
        x = x64.to("cuda", dtype)
        for name in ("anderson", "broyden"):
            f = lambda z, layer=layer, x=x: layer(z, x)  # noqa: E731
            res = SOLVERS[name](f, torch.zeros_like(x), max_iter=400, tol=tol)
            err = float(((res.result.double().cpu() - z_ref).norm(dim=1) / z_ref.norm(dim=1)).max())
            out[f"{name}_{str(dtype)[6:]}"] = dict(
                all_converged=bool(res.converged.all()), nfe=res.nfe, max_rel_err_vs_newton=err
            )
            print(
                f"cuda {name} {dtype}: converged={bool(res.converged.all())} nfe={res.nfe} "
                f"err={err:.1e}",
                flush=True,
            )
    # implicit gradient on CUDA vs a dense solve
    layer = tanh_like(layer64, torch.float64)
    x = x64.cuda()
    w = torch.randn_like(x)
    deq = DEQ(layer, f_thres=400, f_tol=1e-12, b_thres=400, b_tol=1e-12)
    xr = x.clone().requires_grad_()
    z, info = deq(xr, torch.zeros_like(x))
    (gx,) = torch.autograd.grad((z * w).sum(), xr)
    J = layer.jacobian(z.detach(), x)
    eye = torch.eye(J.shape[1], dtype=J.dtype, device=J.device)
    u = torch.linalg.solve((eye - J).transpose(1, 2), w.unsqueeze(2)).squeeze(2)
    xr2 = x.clone().requires_grad_()
    (ox,) = torch.autograd.grad(layer(z.detach(), xr2), xr2, u)
    out["implicit_grad_rel_err"] = float((gx - ox).norm() / ox.norm())
    print(f"cuda implicit grad rel err {out['implicit_grad_rel_err']:.1e}", flush=True)
    return out


def tanh_like(layer, dtype):
    import copy

    return copy.deepcopy(layer).to("cuda", dtype)


def timing(problems, repeats=5):
    rows = []
    entries = [(f"deqray {n}", SOLVERS[n]) for n in ("anderson", "broyden", "fixed_point")]
    try:
        from torchdeq.solver import get_solver

        for n in ("anderson", "broyden", "fixed_point_iter"):
            s = get_solver(n)
            entries.append((f"torchdeq {n}", lambda f, z0, s=s, **kw: s(f, z0, **kw)))
    except ImportError as e:
        print("torchdeq not importable:", e)
    for pname, (layer, x) in problems.items():
        f = lambda z, layer=layer, x=x: layer(z, x)  # noqa: E731
        z0 = torch.zeros_like(x)
        with torch.no_grad():
            for _ in range(20):
                f(z0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                f(z0)
            torch.cuda.synchronize()
            t_f = (time.perf_counter() - t) / 200
            for label, solver in entries:
                calls = [0]

                def counted(z, f=f, calls=calls):
                    calls[0] += 1
                    return f(z)

                walls = []
                for rep in range(repeats + 1):
                    calls[0] = 0
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    out = solver(counted, z0, max_iter=300, tol=1e-4, stop_mode="rel")
                    torch.cuda.synchronize()
                    if rep:
                        walls.append(time.perf_counter() - t)
                z = out.result if hasattr(out, "result") else out[0]
                fz = f(z)
                res = float(((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)).max())
                wall = sorted(walls)[len(walls) // 2]
                rows.append(
                    dict(
                        problem=pname,
                        solver=label,
                        nfe=calls[0],
                        wall_ms=wall * 1e3,
                        f_ms=t_f * 1e3,
                        overhead=1 - calls[0] * t_f / wall,
                        max_rel_residual=res,
                        reached=res <= 1e-4 * 1.0001,
                    )
                )
                r = rows[-1]
                print(
                    f"time {pname:22s} {label:26s} nfe={r['nfe']:4d} wall={r['wall_ms']:8.2f}ms "
                    f"overhead={r['overhead']:6.1%} res={res:.1e} "
                    f"{'ok' if r['reached'] else 'NOT REACHED'}",
                    flush=True,
                )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default="benchmarks/.cache/problems_b32_w512.pt")
    args = ap.parse_args()
    assert torch.cuda.is_available()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.manual_seed(0)
    cpu = torch.load(args.cache, weights_only=False)
    hard64 = tuple(t.double() for t in cpu["hard"])
    layer_h, x_h = tanh_like(cpu["hard"][0], torch.float32), cpu["hard"][1].cuda()
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    report["syncs"] = sync_check(layer_h, x_h)
    small64 = tanh_problem(8, 64, rho=0.98, seed=3, x_scale=0.1)
    report["correctness"] = correctness(*small64)
    problems = {
        "contractive b32 w512": (
            tanh_like(cpu["contractive"][0], torch.float32),
            cpu["contractive"][1].cuda(),
        ),
        "hard b32 w512": (layer_h, x_h),
    }
    big = tanh_problem(256, 1024, rho=0.8, seed=4, calibrate=False, dtype=torch.float32)
    problems["contractive b256 w1024"] = (tanh_like(big[0], torch.float32), big[1].cuda())
    report["timing"] = timing(problems)
    del hard64
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
