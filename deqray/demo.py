"""A small DEQ fitted end to end on the CPU, printing what the solver did.

Three interleaved spirals (2-D points, 3 classes); the model is
x -> injection -> DEQ(z = tanh(W_n z + u) with weight norm and variational
dropout) -> linear head, trained with implicit gradients and Jacobian
regularisation. Each report line shows loss and accuracy next to the
equilibrium's cost: forward/backward steps, residuals, converged fraction.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deqray.core import DEQ, VariationalDropout, apply_weight_norm


def spirals(n: int, *, classes: int = 3, noise: float = 0.15, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.1, 1.0, per)
        t = r * 3.5 + 2 * math.pi * c / classes + noise * torch.randn(per, generator=gen)
        xs.append(torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1))
        ys.append(torch.full((per,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=gen)
    return x[perm], y[perm]


class Cell(nn.Module):
    """f(z, u) = tanh(W z + u), W weight-normalised, dropout locked per forward."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = VariationalDropout(dropout, shared_dims=())
        apply_weight_norm(self)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(self.drop(self.lin(z)) + u)


class SpiralDEQ(nn.Module):
    def __init__(self, width: int = 64, classes: int = 3, dropout: float = 0.05, **deq_options):
        super().__init__()
        self.width = width
        self.inj = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width))
        self.deq = DEQ(Cell(width, dropout), **deq_options)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor, **kw):
        u = self.inj(x)
        z0 = torch.zeros(x.shape[0], self.width, dtype=x.dtype)
        z, info = self.deq(u, z0, **kw)
        return self.head(z), info


@dataclass
class DemoResult:
    train_acc: float
    test_acc: float
    final_metrics: dict
    seconds: float


def run(
    *,
    steps: int = 300,
    batch: int = 128,
    width: int = 64,
    pretrain_steps: int = 50,
    jac_weight: float = 0.5,
    log_every: int = 25,
    seed: int = 0,
    threads: int | None = None,
    print_fn=print,
) -> DemoResult:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x, y = spirals(3000, seed=seed)
    n_train = 2400
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model = SpiralDEQ(width, f_thres=30, f_tol=1e-4, b_thres=30, b_tol=1e-5, eval_f_thres=40)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    print_fn(
        f"deqray demo: DEQ classifier on 3 spirals, width {width}, {steps} steps "
        f"({pretrain_steps} pretraining), Anderson forward, implicit backward"
    )
    print_fn(
        f"{'step':>5} {'mode':>8} {'loss':>7} {'acc':>5} {'fwd_steps':>9} {'fwd_res':>8} "
        f"{'conv':>5} {'bwd_steps':>9} {'bwd_res':>8} {'jac':>7}"
    )
    metrics: dict = {}
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        pretrain = step <= pretrain_steps
        logits, info = model(xtr[idx], pretrain=pretrain, jac_loss=jac_weight > 0)
        loss = nn.functional.cross_entropy(logits, ytr[idx])
        total = loss + jac_weight * info.jac_loss if info.jac_loss is not None else loss
        opt.zero_grad()
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            metrics = info.metrics()
            acc = float((logits.argmax(1) == ytr[idx]).float().mean())
            print_fn(
                f"{step:>5} {info.mode:>8} {float(loss.detach()):7.4f} {acc:5.2f} "
                f"{metrics['fwd_nstep']:9.1f} {metrics['fwd_rel_residual']:8.1e} "
                f"{metrics['fwd_converged']:5.2f} {metrics.get('bwd_nstep', float('nan')):9.1f} "
                f"{metrics.get('bwd_rel_residual', float('nan')):8.1e} "
                f"{metrics.get('jac_loss', float('nan')):7.4f}"
            )
    model.eval()
    with torch.no_grad():
        tr_logits, _ = model(xtr)
        te_logits, te_info = model(xte, sradius=True)
    result = DemoResult(
        train_acc=float((tr_logits.argmax(1) == ytr).float().mean()),
        test_acc=float((te_logits.argmax(1) == yte).float().mean()),
        final_metrics=te_info.metrics(),
        seconds=time.perf_counter() - t0,
    )
    m = result.final_metrics
    print_fn(
        f"eval: train acc {result.train_acc:.3f}, test acc {result.test_acc:.3f}; "
        f"forward steps {m['fwd_nstep']:.1f} (max {m['fwd_nstep_max']:.0f}), "
        f"rel residual {m['fwd_rel_residual']:.1e} (max {m['fwd_rel_residual_max']:.1e}), "
        f"converged {m['fwd_converged']:.3f}, spectral radius {m['sradius']:.3f} "
        f"(max {m['sradius_max']:.3f}); {result.seconds:.1f} s"
    )
    return result
