"""Training-step cost of the DEQ models against the same layer unrolled, side by side.

    python benchmarks/bench_models.py --out benchmarks/results/models.json [--device cuda]

For the tiny presets (`deq-transformer-tiny`, `mdeq-cifar-tiny`), one
training step (forward, backward) is run
  * in DEQ mode with the forward solver forced to run exactly n iterations
    (tolerance 0) and the backward given the same budget, and
  * unrolled: the same weight-tied layer applied n times with ordinary
    backprop (the DEQ's pretrain mode with n layers),
for n in 8, 16, 32, 64. Reported per step: wall time, forward/backward
solver steps, and memory. On the CPU, memory is the bytes of tensors that
autograd keeps for the backward (deduplicated by storage): this is what
grows with depth. On CUDA it is the peak allocated memory of the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

from deqray.core import DEQ, DEQConfig
from deqray.models import build


class SavedBytes:
    """Bytes of distinct storages that autograd saves for the backward."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self._seen:
            self._seen.add(st.data_ptr())
            self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def deq_modules(model):
    return [m for m in model.modules() if isinstance(m, DEQ)]


def set_deq(model, **fields):
    for m in deq_modules(model):
        m.config = DEQConfig.build(m.config, **fields)


def transformer_step(model, batch, seq):
    vocab = model.config.vocab_size if hasattr(model, "config") else 200
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step(pretrain):
        out = model(x.to(DEVICE), y.to(DEVICE), pretrain=pretrain)
        out.loss.backward()
        return out.info

    return step


def mdeq_step(model, batch, size):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)

    def step(pretrain):
        logits, info = model(images.to(DEVICE), pretrain=pretrain)
        torch.nn.functional.cross_entropy(logits, labels.to(DEVICE)).backward()
        return info

    return step


def measure(model, step, pretrain, repeats):
    walls, mem, info = [], 0, None
    for rep in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        with SavedBytes() as saved:
            info = step(pretrain)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        if rep:
            walls.append(wall)
            mem = (torch.cuda.max_memory_allocated() - base) if DEVICE == "cuda" else saved.bytes
    m = info.metrics()
    return dict(
        wall_ms=statistics.median(walls) * 1e3,
        memory_bytes=int(mem),
        fwd_nstep=m["fwd_nstep"],
        bwd_nstep=m.get("bwd_nstep"),
    )


def run_family(name, make_step, depths, repeats, deq_overrides):
    torch.manual_seed(0)
    model = build(name).to(DEVICE).train()
    if deq_overrides:
        set_deq(model, **deq_overrides)
    step = make_step(model)
    rows = []
    base = measure(model, step, False, repeats)  # the preset's own settings
    rows.append(dict(model=name, mode="deq (preset settings)", depth=None, **base))
    print(f"{name}: preset step {base}", flush=True)
    for n in depths:
        set_deq(
            model,
            f_thres=n,
            f_thres_jitter=0,
            f_tol=1e-30,
            b_thres=n,
            b_tol=1e-30,
            pretrain_layers=n,
        )
        deq = measure(model, step, False, repeats)
        unr = measure(model, step, True, repeats)
        rows.append(dict(model=name, mode="deq", depth=n, deq=deq_overrides, **deq))
        rows.append(dict(model=name, mode="unrolled", depth=n, **unr))
        print(
            f"{name} n={n:3d}  deq {deq['wall_ms']:8.1f} ms {deq['memory_bytes'] / 2**20:8.2f} MiB"
            f"  | unrolled {unr['wall_ms']:8.1f} ms {unr['memory_bytes'] / 2**20:8.2f} MiB"
            f"  | memory ratio {deq['memory_bytes'] / unr['memory_bytes']:.3f}"
            f" time ratio {deq['wall_ms'] / unr['wall_ms']:.2f}",
            flush=True,
        )
    return rows


DEVICE = "cpu"


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deq", default="{}", help="JSON of DEQConfig overrides for every DEQ")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    DEVICE = args.device
    over = json.loads(args.deq)
    rows = []
    rows += run_family(
        "deq-transformer-tiny",
        lambda m: transformer_step(m, 8, 16),
        args.depths,
        args.repeats,
        over,
    )
    rows += run_family(
        "mdeq-cifar-tiny", lambda m: mdeq_step(m, 8, 32), args.depths, args.repeats, over
    )
    report = dict(
        date=str(date.today()),
        device=DEVICE,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
