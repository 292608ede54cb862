"""Does a torch.compile'd (fused) solver step pay on the CPU? Compile time against time saved.

    python benchmarks/bench_step_compile.py --threads 1

Two pieces of a solver iteration, on the solver benchmark's shapes (batch 32,
width 512, float32), each run eagerly and compiled with torch.compile
(inductor, C++ codegen with gcc):
  residual  g = f(z) - z, ||g|| and ||f(z)|| per sample (every solver, every step)
  anderson  Anderson's update after f: the new differences, the Gram row and
            right-hand side, the 5 x 5 solve and the mixing (history full)
Reported: the first call's time (compilation included), the per-call time of
each afterwards, and the number of solver steps the compiled version needs to
win back its compilation. A compiled step is not used in deqray.core because
on this machine it is slower per call than the eager one (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def residual(fz, z):
    g = fz - z
    return g, torch.linalg.vector_norm(g, dim=1), torch.linalg.vector_norm(fz, dim=1)


def anderson_update(fz, z, g_prev, y_prev, G, X, H, s: int, lam: float = 1e-4):
    g = fz - z
    G[:, s] = g - g_prev
    X[:, s] = fz - y_prev
    row = torch.bmm(G[:, s : s + 1], G.transpose(1, 2))[:, 0]
    rhs = torch.bmm(g.unsqueeze(1), G.transpose(1, 2))
    dx2 = X[:, s].pow(2).sum(1)
    row = row.clone()
    row[:, s] = row[:, s] * (1 + lam) + lam * dx2
    H[:, s, :] = row
    H[:, :, s] = row
    gamma = torch.linalg.solve(H, rhs.transpose(1, 2)).transpose(1, 2)
    return torch.baddbmm(fz.unsqueeze(1), gamma, X, alpha=-1).squeeze(1), g


def per_call(fn, calls=200, rounds=7):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def compare(name, fn, args):
    eager = per_call(lambda: fn(*args))
    compiled = torch.compile(fn, dynamic=False)
    t = time.perf_counter()
    compiled(*args)
    first = time.perf_counter() - t
    fused = per_call(lambda: compiled(*args))
    saved = eager - fused
    pays = f"after {first / saved:,.0f} steps" if saved > 0 else "never (slower per call)"
    print(
        f"{name:9s} eager {eager * 1e6:7.1f} us | compiled {fused * 1e6:7.1f} us "
        f"| first call {first:6.1f} s | pays back {pays}",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, D, m = 32, 512, 5
    g = torch.Generator().manual_seed(0)
    fz, z, g_prev, y_prev = (torch.randn(B, D, generator=g) for _ in range(4))
    G, X = torch.randn(B, m, D, generator=g), torch.randn(B, m, D, generator=g)
    H = G @ G.transpose(1, 2) + torch.eye(m)
    with torch.no_grad():
        compare("residual", residual, (fz, z))
        compare("anderson", anderson_update, (fz, z, g_prev, y_prev, G, X, H, 2))


if __name__ == "__main__":
    main()
