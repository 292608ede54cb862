"""A training step of deqray against the reference DEQ code (locuslab/deq), in one run.

    python benchmarks/bench_reference.py --reference-dir ~/src/deq \\
        --reference-python ~/venvs/deq-ref/bin/python --threads 1 --rounds 3 \\
        --out benchmarks/results/reference.json

The reference runs in its own environment (torch 2.13 for the CPU, scipy,
termcolor, yacs, tqdm; `--reference-python`), on an unmodified checkout of
locuslab/deq (`--reference-dir`). Its code assumes CUDA and an older torch in
three places, which the reference side shims at run time instead of editing
the checkout: `torch.version.cuda` read at import (proj_adaptive_softmax.py),
`torch.cuda.synchronize()` in both backward hooks, and `torch.solve` (removed
from torch) in its Anderson solver, answered by `torch.linalg.solve`.

Models, the same on both sides:
  transformer  DEQ-Transformer, vocabulary 1000, d_model 128, 4 heads of 32,
               d_inner 512, weight norm, post-LN without affine terms, 16-token
               segments with a 16-token memory from a previous segment, batch 16;
  mdeq         the CIFAR-10 MDEQ-tiny (cls_mdeq_TINY.yaml / mdeq-cifar-tiny),
               batch 32 images of 32x32.
Dropout is off on both sides, and neither computes a Jacobian loss.

Settings:
  equal     both solves run exactly --iters iterations (tolerance 0): the
            transformer with Anderson (m=6) forward and Broyden backward, MDEQ
            with Broyden both ways, on both sides;
  defaults  each side's own solver defaults: the reference's training
            scripts (transformer 40/40 iterations, MDEQ 18/20, its solvers'
            eps 1e-3) against deqray's presets (deq-transformer-tiny's and
            mdeq-cifar-tiny's solver settings).

A step is zero_grad, forward in DEQ mode, loss and backward (no optimizer
step), on a fixed batch. Each round runs every (model, setting) once per
side in a fresh process, the two sides back to back in alternating order;
a process times --steps MDEQ steps (--lm-steps transformer steps, which
take a few milliseconds) after one warm-up step. Reported: the median
step over rounds, its evaluations of f forward and backward, and
ratio = deqray / reference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("transformer", "mdeq")
SETTINGS = ("equal", "defaults")
VOCAB, D_MODEL, N_HEAD, D_HEAD, D_INNER, SEG, LM_BATCH = 1000, 128, 4, 32, 512, 16, 16
IMAGE_BATCH = 32
REF_DEFAULTS = {"transformer": (40, 40), "mdeq": (18, 20)}  # (f_thres, b_thres)
REF_SOLVERS = {"transformer": ("anderson", "broyden"), "mdeq": ("broyden", "broyden")}
TIGHT = 1e-30  # a tolerance no solve reaches: every solve runs its whole budget


# ----------------------------------------------------------------------------- timing


def time_steps(step, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of step(), after one warm-up call."""
    import torch

    step()
    walls = []
    for _ in range(steps):
        torch.manual_seed(1)
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
    return walls


# ----------------------------------------------------------------------------- deqray side


def deqray_model(model: str, setting: str, iters: int):
    from deqray.models import build

    if model == "transformer":
        overrides = dict(
            preset="deq-transformer-tiny",
            vocab_size=VOCAB,
            d_model=D_MODEL,
            n_head=N_HEAD,
            d_head=D_HEAD,
            d_inner=D_INNER,
            dropout=0.0,
            tgt_len=SEG,
            mem_len=SEG,
            norm_affine=False,  # the reference's LayerNorms have no parameters
            attn_out_bias=True,  # and its attention output projection has a bias
        )
    else:
        overrides = dict(preset="mdeq-cifar-tiny", dropout=0.0)
    net = build(overrides).train()
    if setting == "equal":
        from bench_step import set_deq

        fields = dict(f_thres=iters, f_tol=TIGHT, b_thres=iters, b_tol=TIGHT, f_thres_jitter=0)
        if model == "transformer":
            fields.update(f_solver="anderson", f_solver_options={"m": 6}, b_solver="broyden")
        else:
            fields.update(f_solver="broyden", b_solver="broyden")
        set_deq(net, **fields)
    return net


def deqray_side(model: str, setting: str, iters: int, steps: int) -> dict:
    """bench_step's fixed-batch step of the model, timed; its evaluations from the last step."""
    import torch
    from bench_step import mdeq_step, transformer_step

    torch.manual_seed(0)
    net = deqray_model(model, setting, iters)
    if model == "transformer":
        run = transformer_step(net, LM_BATCH)  # a 16-token memory from a previous segment
    else:
        run = mdeq_step(net, IMAGE_BATCH)
    seen = {}

    def step():
        net.zero_grad(set_to_none=True)
        seen["metrics"] = run().metrics()

    walls = time_steps(step, steps)
    m = seen["metrics"]
    return dict(walls=walls, fwd_nfe=int(m["fwd_nfe"]), bwd_nfe=int(m["bwd_nfe"]))


# ----------------------------------------------------------------------------- reference side


def shim_torch_for_reference(torch) -> None:
    """The three places where the reference assumes CUDA or an older torch (module doc)."""
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.solve = lambda b, a: (torch.linalg.solve(a, b), None)


def counted(solver, counts: dict, key: str, eps: float | None):
    """The reference solver with its evaluations of f counted (and its eps set, if given)."""

    def run(f, x0, **kwargs):
        def f_counted(z):
            counts[key] += 1
            return f(z)

        if eps is not None:
            kwargs["eps"] = eps
        return solver(f_counted, x0, **kwargs)

    return run


def reference_transformer(ref_dir: str, setting: str, iters: int, counts: dict):
    import torch

    seq_dir = os.path.join(ref_dir, "DEQ-Sequence")
    sys.path[:0] = [seq_dir, ref_dir]  # as train_transformer.py runs: from DEQ-Sequence, '../'
    cuda_version = torch.version.cuda
    torch.version.cuda = cuda_version or "0.0"  # read (unused) at import
    try:
        from lib.solvers import anderson, broyden
        from models.deq_transformer import DEQTransformerLM
    finally:
        torch.version.cuda = cuda_version
    eps = TIGHT if setting == "equal" else None
    net = DEQTransformerLM(
        n_token=VOCAB,
        n_layer=2,
        eval_n_layer=2,
        n_head=N_HEAD,
        d_model=D_MODEL,
        d_head=D_HEAD,
        d_inner=D_INNER,
        dropout=0.0,
        dropatt=0.0,
        tie_weights=True,
        d_embed=D_MODEL,
        div_val=1,
        tie_projs=[False],
        pre_lnorm=False,
        wnorm=True,
        local_size=0,
        pretrain_steps=0,
        tgt_len=SEG,
        mem_len=SEG,
        cutoffs=[],
        load="",
        f_solver=counted(anderson, counts, "fwd", eps),
        b_solver=counted(broyden, counts, "bwd", eps),
        stop_mode="rel",
        logging=lambda *a, **k: None,
    )
    net.apply(functools.partial(reference_init, torch.nn))
    f_thres, b_thres = reference_thresholds("transformer", setting, iters)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2 * SEG + 1, LM_BATCH), generator=g)  # (time, batch)
    x0, x1, y1 = tokens[:SEG], tokens[SEG:-1], tokens[SEG + 1 :]
    net.train()
    # the memory of a previous segment, as in training (its graph is dropped)
    out = net(x0, tokens[1 : SEG + 1], [], train_step=-1, f_thres=f_thres, b_thres=b_thres,
              compute_jac_loss=False, writer=None)  # fmt: skip
    mems = [m.detach() for m in out[3:]]

    def step():
        net.zero_grad(set_to_none=True)
        # a new list each time: the forward replaces the list's entries by permuted ones
        ret = net(x1, y1, list(mems), train_step=-1, f_thres=f_thres, b_thres=b_thres,
                  compute_jac_loss=False, writer=None)  # fmt: skip
        ret[0].float().mean().backward()

    return step


def reference_thresholds(model: str, setting: str, iters: int) -> tuple[int, int]:
    """The reference's (f_thres, b_thres): for 'equal', the ones that make `iters` evaluations.

    Its Anderson evaluates f `threshold` times; its Broyden evaluates f once
    before its `threshold` updates, so threshold + 1 times.
    """
    if setting != "equal":
        return REF_DEFAULTS[model]
    f_solver, b_solver = REF_SOLVERS[model]
    return tuple(iters - (name == "broyden") for name in (f_solver, b_solver))


def reference_init(nn, module) -> None:
    """The reference training script's initialisation (normal, std 0.01) for its module types."""
    name = type(module).__name__
    if "Linear" in name or "Conv1d" in name or name == "Embedding":
        if getattr(module, "weight", None) is not None:
            nn.init.normal_(module.weight, 0.0, 0.01)
        if getattr(module, "bias", None) is not None:
            nn.init.constant_(module.bias, 0.0)
    elif "AdaptiveEmbedding" in name:
        for p in getattr(module, "emb_projs", []):
            nn.init.normal_(p, 0.0, 0.01)
    elif "WeightShareSelfAttention" in name:
        for attr in ("r_w_bias", "r_r_bias"):
            if hasattr(module, attr):
                nn.init.normal_(getattr(module, attr), 0.0, 0.01)


def reference_mdeq(ref_dir: str, setting: str, iters: int, counts: dict):
    import types

    import torch

    vis_dir = os.path.join(ref_dir, "MDEQ-Vision")
    # tools/_init_paths.py adds lib; mdeq.py appends lib/models and ../ from MDEQ-Vision
    sys.path[:0] = [os.path.join(vis_dir, "lib"), os.path.join(vis_dir, "lib", "models"), ref_dir]
    os.chdir(vis_dir)
    import models
    from config.default import _C as config
    from config.default import update_config

    f_thres, b_thres = reference_thresholds("mdeq", setting, iters)
    opts = ["DEQ.F_THRES", f_thres, "DEQ.B_THRES", b_thres, "MODEL.DROPOUT", 0.0]
    args = types.SimpleNamespace(
        cfg=os.path.join(vis_dir, "experiments", "cifar", "cls_mdeq_TINY.yaml"),
        modelDir="",
        logDir="",
        dataDir="",
        testModel="",
        percent=1.0,
        opts=opts,
    )
    update_config(config, args)
    net = models.mdeq.get_cls_net(config)
    eps = TIGHT if setting == "equal" else None
    net.f_solver = counted(net.f_solver, counts, "fwd", eps)
    net.b_solver = counted(net.b_solver, counts, "bwd", eps)
    net.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(IMAGE_BATCH, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (IMAGE_BATCH,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        net.zero_grad(set_to_none=True)
        logits, _, _ = net(images, train_step=-1, compute_jac_loss=False, f_thres=f_thres,
                           b_thres=b_thres, writer=None)  # fmt: skip
        loss_fn(logits, labels).backward()

    return step


def reference_side(ref_dir: str, model: str, setting: str, iters: int, steps: int) -> dict:
    import torch

    shim_torch_for_reference(torch)
    torch.manual_seed(0)
    counts = {"fwd": 0, "bwd": 0}
    make = reference_transformer if model == "transformer" else reference_mdeq
    step = make(os.path.abspath(ref_dir), setting, iters, counts)
    counts.update(fwd=0, bwd=0)  # the memory segment's forward counted too
    step()
    nfe = dict(counts)  # one step's evaluations
    return dict(walls=time_steps(step, steps), fwd_nfe=nfe["fwd"], bwd_nfe=nfe["bwd"])


# ----------------------------------------------------------------------------- driver


def run_side(side: str, python: str, args, model: str, setting: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [python, os.path.abspath(__file__), "--side", side, "--model", model]
    steps = args.lm_steps if model == "transformer" else args.steps
    cmd += ["--setting", setting, "--iters", str(args.iters), "--steps", str(steps)]
    cmd += ["--threads", str(args.threads), "--reference-dir", os.path.abspath(args.reference_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    if done.returncode:
        raise SystemExit(f"{side} side of {model}/{setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def drive(args) -> None:
    if not os.path.isdir(os.path.join(args.reference_dir, "DEQ-Sequence")):
        raise SystemExit(f"--reference-dir {args.reference_dir}: no DEQ-Sequence/ there")
    sides = {"deqray": sys.executable, "reference": args.reference_python}
    runs: dict[tuple, dict] = {}
    for r in range(args.rounds):
        for model in args.models:
            for setting in SETTINGS:
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                for side in order:
                    rec = run_side(side, sides[side], args, model, setting)
                    prev = runs.setdefault((model, setting, side), dict(rec, walls=[]))
                    prev["walls"].append(statistics.median(rec["walls"]))
                    print(f"round {r} {model:11s} {setting:8s} {side:9s} "
                          f"{statistics.median(rec['walls']) * 1e3:8.1f} ms "
                          f"(f {rec['fwd_nfe']} / {rec['bwd_nfe']})", flush=True)  # fmt: skip
    rows = []
    for model in args.models:
        for setting in SETTINGS:
            ours, ref = runs[(model, setting, "deqray")], runs[(model, setting, "reference")]
            a, b = statistics.median(ours["walls"]), statistics.median(ref["walls"])
            rows.append(dict(
                model=model, setting=setting, deqray_ms=a * 1e3, reference_ms=b * 1e3,
                ratio=a / b, deqray_nfe=[ours["fwd_nfe"], ours["bwd_nfe"]],
                reference_nfe=[ref["fwd_nfe"], ref["bwd_nfe"]],
                deqray_rounds_ms=[w * 1e3 for w in ours["walls"]],
                reference_rounds_ms=[w * 1e3 for w in ref["walls"]],
            ))  # fmt: skip
            print(f"{model:11s} {setting:8s} deqray {a * 1e3:8.1f} ms (f {ours['fwd_nfe']}/"
                  f"{ours['bwd_nfe']})  reference {b * 1e3:8.1f} ms (f {ref['fwd_nfe']}/"
                  f"{ref['bwd_nfe']})  ratio {a / b:.2f}x")  # fmt: skip
    if args.out:
        report = dict(
            date=str(date.today()),
            machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor()}",
            threads=args.threads,
            iters=args.iters,
            steps={"transformer": args.lm_steps, "mdeq": args.steps},
            rounds=args.rounds,
            rows=rows,
        )
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-dir", required=True, help="a checkout of locuslab/deq")
    ap.add_argument("--reference-python", default=None, help="the reference's environment")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=12, help="iterations of each solve, 'equal'")
    ap.add_argument("--steps", type=int, default=3, help="timed MDEQ steps per process")
    ap.add_argument("--lm-steps", type=int, default=20, help="timed transformer steps per process")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--side", choices=("deqray", "reference"), help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    ap.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side is None:
        if not args.reference_python:
            raise SystemExit("--reference-python: the reference's environment is needed")
        return drive(args)
    import torch

    torch.set_num_threads(args.threads)
    if args.side == "deqray":
        rec = deqray_side(args.model, args.setting, args.iters, args.steps)
    else:
        rec = reference_side(args.reference_dir, args.model, args.setting, args.iters, args.steps)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
