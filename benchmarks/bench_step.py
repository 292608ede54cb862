"""A DEQ training step of the tiny presets against its physical limit, in one run.

    python benchmarks/bench_step.py --threads 1 2 --out benchmarks/results/step.json

The limit of a training step in DEQ mode (implicit gradient) is

    forward NFE x t_f + backward NFE x t_vjp + t_rest

with, each measured in the same run at the same thread count:
  t_f     one call of the equilibrium layer f(z, x) at the step's equilibrium,
          without autograd (what the forward solver calls),
  t_vjp   one vector-Jacobian product u -> u^T df/dz there (what the backward
          solver calls),
  t_rest  the rest of the network, forward and backward: the same step in
          pretrain mode with one layer (stem, one f with autograd, head, loss,
          and the backward through all of them).
`ratio` = step time / limit: 1.0 would mean that the solvers, the state's
flattening and the implicit-gradient plumbing cost nothing.

Rows: each preset at its own solver settings, and with both solves forced
to run exactly `--fixed` iterations (tolerance 0), the setting of the
comparison against the reference code. `--baseline-core DIR` (the
deqray/core of another version) also times the same steps with that
version's solvers registered in place of these, interleaved repeat by
repeat with the current ones (before/after in one run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch
from bench_solvers import load_baseline

from deqray.core import DEQ, DEQConfig, get_solver, register_solver
from deqray.core.regularizers import dropout_scope, weight_norm_cache
from deqray.models import build


def per_call(fn, calls=10, rounds=7):
    """Median seconds of one call of fn, over `rounds` batches of `calls` calls."""
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def the_deq(model) -> DEQ:
    (deq,) = [m for m in model.modules() if isinstance(m, DEQ)]
    return deq


def set_deq(model, **fields):
    deq = the_deq(model)
    deq.config = DEQConfig.build(deq.config, **fields)


def transformer_step(model, batch):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 2 * cfg.tgt_len + 1), generator=g)
    x0, x1, y1 = tokens[:, : cfg.tgt_len], tokens[:, cfg.tgt_len : -1], tokens[:, cfg.tgt_len + 1 :]
    with torch.no_grad():  # the memory of a previous segment, as in training
        mems = model(x0, pretrain=True).mems

    def step(pretrain=False):
        out = model(x1, y1, mems, pretrain=pretrain)
        out.loss.backward()
        return out.info

    return step


def mdeq_step(model, batch):
    g = torch.Generator().manual_seed(0)
    size = model.config.image_size
    images = torch.randn(batch, model.config.in_channels, *size, generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g)

    def step(pretrain=False):
        logits, info = model(images, pretrain=pretrain)
        model.loss(logits, labels).backward()
        return info

    return step


SOLVER_NAMES = ("anderson", "broyden", "fixed_point")


def one_step(model, step, pretrain):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks, hence the same solves, every time
    t = time.perf_counter()
    info = step(pretrain)
    return time.perf_counter() - t, info


def timed_step(model, step, pretrain, repeats, baseline=None):
    """Median step time (and the baseline solvers', interleaved, when given)."""
    walls, base_walls, info = [], [], None
    ours = {n: get_solver(n) for n in SOLVER_NAMES}
    for rep in range(repeats + 1):
        wall, info = one_step(model, step, pretrain)
        if rep:
            walls.append(wall)
        if baseline is not None:
            for n in SOLVER_NAMES:
                register_solver(n, baseline.get_solver(n), replace=True)
            try:
                wall, _ = one_step(model, step, pretrain)
            finally:
                for n in SOLVER_NAMES:
                    register_solver(n, ours[n], replace=True)
            if rep:
                base_walls.append(wall)
    base = statistics.median(base_walls) if base_walls else None
    return statistics.median(walls), info, base


def f_costs(model, step):
    """t_f and t_vjp at the equilibrium of one step, with the step's weights and masks."""
    deq = the_deq(model)
    seen = []
    handle = deq.f.register_forward_hook(lambda mod, args, out: seen.append(args))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    step(False)
    handle.remove()
    z, x = seen[-1]  # the last call is f at z* with autograd on (the implicit gradient's)
    z = [t.detach() for t in z] if isinstance(z, (list, tuple)) else z.detach()
    with weight_norm_cache(deq.f), dropout_scope():
        with torch.no_grad():
            t_f = per_call(lambda: deq.f(z, x))
        z_in = [t.requires_grad_() for t in z] if isinstance(z, list) else z.requires_grad_()
        fz = deq.f(z_in, x)
        g = torch.Generator().manual_seed(2)
        outs = fz if isinstance(fz, list) else [fz]
        ins = z_in if isinstance(z_in, list) else [z_in]
        u = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        t_vjp = per_call(lambda: torch.autograd.grad(outs, ins, u, retain_graph=True))
    return t_f, t_vjp


def measure(name, model, step, nt, repeats, label, baseline=None):
    t_f, t_vjp = f_costs(model, step)
    wall, info, base = timed_step(model, step, False, repeats, baseline)
    m = info.metrics()
    fwd_nfe, bwd_nfe = int(m["fwd_nfe"]), int(m["bwd_nfe"])
    layers = the_deq(model).config.pretrain_layers
    set_deq(model, pretrain_layers=1)
    t_rest, _, _ = timed_step(model, step, True, repeats)
    set_deq(model, pretrain_layers=layers)
    limit = fwd_nfe * t_f + bwd_nfe * t_vjp + t_rest
    row = dict(
        threads=nt,
        model=name,
        settings=label,
        step_ms=wall * 1e3,
        fwd_nfe=fwd_nfe,
        bwd_nfe=bwd_nfe,
        t_f_ms=t_f * 1e3,
        t_vjp_ms=t_vjp * 1e3,
        t_rest_ms=t_rest * 1e3,
        limit_ms=limit * 1e3,
        ratio=wall / limit,
    )
    if base is not None:
        row.update(baseline_step_ms=base * 1e3, baseline_ratio=base / limit)
    print(
        f"threads={nt} {name:22s} {label:16s} step={wall * 1e3:7.1f}ms "
        f"fwd={fwd_nfe:3d}x{t_f * 1e3:.2f} bwd={bwd_nfe:3d}x{t_vjp * 1e3:.2f} "
        f"rest={t_rest * 1e3:.1f} limit={limit * 1e3:7.1f}ms ratio={wall / limit:.2f}x"
        + (
            ""
            if base is None
            else f" | baseline step={base * 1e3:7.1f}ms ratio={base / limit:.2f}x"
        ),
        flush=True,
    )
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fixed", type=int, default=12, help="iterations of the forced-budget rows")
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--image-batch", type=int, default=32)
    ap.add_argument("--baseline-core", default=None, help="another version's deqray/core")
    ap.add_argument("--only", default=None, help="run one preset only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    baseline = load_baseline(args.baseline_core) if args.baseline_core else None
    families = [
        ("deq-transformer-tiny", lambda m: transformer_step(m, args.lm_batch)),
        ("mdeq-cifar-tiny", lambda m: mdeq_step(m, args.image_batch)),
    ]
    rows = []
    for nt in args.threads:
        torch.set_num_threads(nt)
        for name, make_step in families:
            if args.only and name != args.only:
                continue
            torch.manual_seed(0)
            model = build(name).train()
            step = make_step(model)
            preset = dict(the_deq(model).config.__dict__)
            rows.append(measure(name, model, step, nt, args.repeats, "preset", baseline))
            n = args.fixed
            set_deq(model, f_thres=n, f_tol=1e-30, b_thres=n, b_tol=1e-30, f_thres_jitter=0)
            rows.append(measure(name, model, step, nt, args.repeats, f"fixed {n}/{n}", baseline))
            the_deq(model).config = DEQConfig.build(preset)
    report = dict(
        date=str(date.today()),
        machine=f"{platform.machine()}, torch {torch.__version__}",
        lm_batch=args.lm_batch,
        image_batch=args.image_batch,
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
