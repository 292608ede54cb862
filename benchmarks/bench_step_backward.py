"""The implicit backward's tolerance and budget against the gradient error they buy, per preset.

    python benchmarks/bench_step_backward.py --threads 1 --out benchmarks/results/step_backward.json

For each tiny preset (deq-transformer-tiny, mdeq-cifar-tiny) in DEQ mode, one
training step on a fixed batch, with the dropout masks fixed by the seed so
that every run solves the same forward. The reference gradient is the same
step with the backward solved to the end (600 steps, tolerance 1e-7, close
to float32's floor), once with Anderson and once with Broyden; the two must
agree, which bounds the reference's own error (where they do not, no solve
converges at this state and the preset is skipped). Then, for each backward
solver, tolerance and budget: the relative error of the whole parameter
gradient against the reference, the backward steps actually taken, the
converged fraction, and the step time (median of `--repeats`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from datetime import date

import torch
from bench_step import mdeq_step, set_deq, the_deq, transformer_step

from deqray.models import build


def grads_of(model, step, repeats):
    walls, info, flat = [], None, None
    for rep in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        t = time.perf_counter()
        info = step(False)
        wall = time.perf_counter() - t
        if rep:
            walls.append(wall)
        if flat is None:
            flat = torch.cat(
                [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
            ).clone()
    return flat, statistics.median(walls) if walls else wall, info.metrics()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def sweep(name, model, step, solvers, tols, budgets, repeats):
    rows = []
    preset = dict(the_deq(model).config.__dict__)
    refs = {}
    for solver in ("anderson", "broyden"):
        set_deq(model, b_solver=solver, b_thres=600, b_tol=1e-7)
        refs[solver], _, m = grads_of(model, step, 0)
        print(f"{name}: reference with {solver}: bwd_nstep {m['bwd_nstep']:.0f}", flush=True)
    ref = refs["anderson"]
    ref_gap = rel(refs["broyden"], ref)
    print(f"{name}: the two references differ by {ref_gap:.1e}", flush=True)
    if ref_gap > 1e-3:
        # No solve converges at this state (at initialisation an MDEQ's f is not
        # contractive): there is no exact gradient to measure errors against.
        print(f"{name}: no reference gradient (the backward does not converge); skipped")
        set_deq(model, **{k: preset[k] for k in ("b_solver", "b_tol", "b_thres")})
        return [dict(model=name, kind="no reference", reference_gap=ref_gap)]
    settings = [("preset", preset["b_solver"], preset["b_tol"], preset["b_thres"])]
    settings += [("grid", *s) for s in itertools.product(solvers, tols, budgets)]
    for kind, solver, tol, budget in settings:
        set_deq(model, b_solver=solver, b_tol=tol, b_thres=budget)
        g, wall, m = grads_of(model, step, repeats)
        row = dict(
            model=name,
            kind=kind,
            b_solver=solver,
            b_tol=tol,
            b_thres=budget,
            grad_rel_error=rel(g, ref),
            reference_gap=ref_gap,
            step_ms=wall * 1e3,
            bwd_nstep=m["bwd_nstep"],
            bwd_converged=m["bwd_converged"],
            fwd_nstep=m["fwd_nstep"],
        )
        rows.append(row)
        print(
            f"{name:22s} {kind:6s} {solver:9s} b_tol={tol:.0e} b_thres={budget:3d} "
            f"err={row['grad_rel_error']:.2e} bwd_nstep={m['bwd_nstep']:5.1f} "
            f"conv={m['bwd_converged']:.2f} step={wall * 1e3:8.1f}ms",
            flush=True,
        )
    set_deq(model, **{k: preset[k] for k in ("b_solver", "b_tol", "b_thres")})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--solvers", nargs="+", default=["broyden", "anderson"])
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5])
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 12, 16, 20, 25, 35])
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--image-batch", type=int, default=32)
    ap.add_argument("--only", default=None, help="run one preset only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    families = [
        ("deq-transformer-tiny", lambda m: transformer_step(m, args.lm_batch)),
        ("mdeq-cifar-tiny", lambda m: mdeq_step(m, args.image_batch)),
    ]
    rows = []
    for name, make_step in families:
        if args.only and name != args.only:
            continue
        torch.manual_seed(0)
        model = build(name).train()
        rows += sweep(
            name, model, make_step(model), args.solvers, args.tols, args.budgets, args.repeats
        )
    report = dict(
        date=str(date.today()),
        machine=f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
