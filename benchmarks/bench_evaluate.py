"""`deqray evaluate` on the CPU: the compute-quality curve's cost, and evaluation throughput.

    python benchmarks/bench_evaluate.py --out benchmarks/results/evaluate_cpu.json

A short training run of each laptop task (digits-tiny: classification;
markov-tiny: the language model), then, on its test split, side by side:
  * the curve at --budgets (one call of `evaluate_run` with every budget),
  * a separate evaluation at each budget, and
  * the single largest one alone.
For classification the curve comes from one solve per batch (its snapshots);
for the language model it is one pass per budget (its memory depends on the
budget). Reported: seconds, the ratios curve / largest and curve / separate
(target for classification: <= 1.2x the largest), and the throughput of the
largest evaluation (images/s, tokens/s). Each timing is the median of
--repeats runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WORKLOADS = {
    "classification": ("digits-tiny", ["optim.steps=60", "train.pretrain_steps=20"], "test_images"),
    "language_model": (
        "markov-tiny",
        ["optim.steps=60", "train.pretrain_steps=20", "data.options={tokens: 60000}"],
        "test_tokens",
    ),
}


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def workload(name: str, args, tmp: str) -> dict:
    from deqray.evaluate import evaluate_run
    from deqray.train.driver import fit

    config, overrides, items_key = WORKLOADS[name]
    result = fit(
        config,
        [*overrides, f"train.eval_every={overrides[0].split('=')[1]}", f"data.cache={tmp}/cache"],
        workers=1,
        storage=f"{tmp}/runs",
        verbose=False,
    )
    run, budgets = result.path, args.budgets

    def ev(b):
        return evaluate_run(run, budgets=b, batch_size=args.batch_size, progress=False)

    ev(budgets[-1:])  # warm-up: data generated and cached, torch warm
    curve_s, curve = timed(lambda: ev(budgets), args.repeats)
    separate = {k: timed(lambda k=k: ev([k]), args.repeats) for k in budgets}
    largest_s, largest = separate[budgets[-1]]
    sum_s = sum(s for s, _ in separate.values())
    same = all(
        curve.points[i].metrics == separate[k][1].points[0].metrics for i, k in enumerate(budgets)
    )
    items = largest.points[0].metrics[items_key]
    out = {
        "config": config,
        "budgets": budgets,
        "curve_s": curve_s,
        "separate_s": {str(k): s for k, (s, _) in separate.items()},
        "largest_s": largest_s,
        "curve_over_largest": curve_s / largest_s,
        "curve_over_separate": curve_s / sum_s,
        "points_equal_separate": same,
        "throughput_per_s": items / largest_s,
        "items": items,
        "primary": [p.metrics[curve.primary] for p in curve.points],
        "fwd_nstep": [p.metrics[f"{curve.split}_fwd_nstep"] for p in curve.points],
    }
    print(
        f"  {name}: curve {curve_s:.2f} s, largest alone {largest_s:.2f} s "
        f"({out['curve_over_largest']:.2f}x), all separate {sum_s:.2f} s "
        f"({out['curve_over_separate']:.2f}x); points equal separate: {same}; "
        f"{out['throughput_per_s']:,.0f} {items_key[5:]}/s at f_thres {budgets[-1]}",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray
    import torch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": str(date.today()),
        },
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["tasks"] = {name: workload(name, args, tmp) for name in args.tasks}
    ray.shutdown()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
