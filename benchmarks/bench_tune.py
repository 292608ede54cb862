"""Sweeps on Ray Tune + Optuna (`deqray tune`) on the quickstart study, CPU.

    python benchmarks/bench_tune.py            # ~25 min on 2 cores; results/tune_cpu.json
    python benchmarks/bench_tune.py --quick    # one study of 4 short trials; writes no file

Every study is `deqray tune search_spaces/quickstart.yaml` run as its own
process on a fresh local Ray (`RAY_ADDRESS=local`), one after the other,
with only the sampler, the scheduler and the sampler's seed changed. Read
back with `deqray.tune.runner.load_results`. What is measured:

1. The shipped study (multi-objective TPE, ASHA, 8 trials, 2 at a time):
   wall time of the command (Ray start, data, every trial, the summary)
   and trials per hour.
2. ASHA's saving: the same study with `scheduler={name: none}` (every trial
   runs its 400 steps): wall time and training steps against ASHA's, and
   the best perplexity each found.
3. TPE against random search at equal budget (8 trials, ASHA, same
   reference first trial), for several sampler seeds (`sampler.seed`; the
   training seed stays the study's, so a configuration trains the same in
   every study): the best finished perplexity, the best perplexity at or
   below half the reference's forward steps, and the hypervolume of the
   finished trials' (val_ppl, val_fwd_nstep) front below the point (100, 25).
4. The target: a finished trial within 2% of the hand-set reference's
   perplexity (the study's first trial, markov-tiny's settings) at half or
   less of its forward solver steps, in each study. The reference's values
   are those of its full run in the study without a scheduler (ASHA may stop
   the reference itself in a study where a better trial reached a rung first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "search_spaces" / "quickstart.yaml"
OUT = ROOT / "benchmarks" / "results" / "tune_cpu.json"
HV_POINT = (100.0, 25.0)  # (val_ppl, val_fwd_nstep) bound of the hypervolume


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` (both objectives minimised) inside the box below `ref`."""
    area, best_y = 0.0, ref[1]
    pts = sorted((x, y) for x, y in points if x < ref[0] and y < ref[1])
    for i, (x, y) in enumerate(pts):
        if y >= best_y:
            continue  # dominated by a point with a smaller x
        best_y = y
        nxt = next((x2 for x2, y2 in pts[i + 1 :] if y2 < y), ref[0])
        area += (nxt - x) * (ref[1] - y)
    return area


def run_study(
    label: str, overrides: list[str], storage: str, timeout: int, baseline: dict | None = None
) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local"}
    cmd = [
        sys.executable,
        "-m",
        "deqray.cli",
        "tune",
        str(STUDY),
        *overrides,
        "--storage",
        storage,
        "--name",
        label,
    ]
    log = Path(storage) / f"{label}.log"
    print(f"== {label}: {' '.join(overrides) or '(as shipped)'}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: deqray tune exited {proc.returncode}; log: {log}")
    from deqray.tune.runner import load_results

    res = load_results(os.path.join(storage, label))
    return summarise(label, overrides, res, wall, baseline)


def summarise(label: str, overrides: list[str], res, wall: float, baseline=None) -> dict:
    study = res.study
    rows = res.rows
    ref_point = study.reference_points()[0]
    ref = next(r for r in rows if all(r.get(k) == v for k, v in ref_point.items()))
    base = baseline or {"val_ppl": ref["val_ppl"], "val_fwd_nstep": ref["val_fwd_nstep"]}
    if baseline is None and ref["status"] != "finished":
        raise SystemExit(f"{label}: the reference trial did not finish; give a baseline")
    every = study.fixed.train.eval_every
    steps = sum(int(r["reports"]) * every for r in rows)
    finished = [r for r in rows if r["status"] == "finished"]
    pts = [(r["val_ppl"], r["val_fwd_nstep"]) for r in finished]
    half = [r for r in finished if r["val_fwd_nstep"] <= 0.5 * base["val_fwd_nstep"]]
    hits = [r for r in half if r["val_ppl"] <= 1.02 * base["val_ppl"]]
    keys = list(study.space)
    out = {
        "label": label,
        "overrides": overrides,
        "experiment": res.experiment,
        "wall_s": wall,
        "trials": len(rows),
        "trials_per_hour": len(rows) / (wall / 3600),
        "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
        "train_steps": steps,
        "reference": {
            "status": ref["status"],
            "val_ppl": ref["val_ppl"],
            "val_fwd_nstep": ref["val_fwd_nstep"],
        },
        "best_ppl": min((r["val_ppl"] for r in finished), default=math.nan),
        "best_ppl_at_half_steps": min((r["val_ppl"] for r in half), default=math.nan),
        "hypervolume": hypervolume_2d(pts, HV_POINT),
        "baseline": base,
        "target_met": bool(hits),
        "target_trials": [
            {
                "trial_id": r["trial_id"],
                "val_ppl": r["val_ppl"],
                "val_fwd_nstep": r["val_fwd_nstep"],
                **{k: r[k] for k in keys},
            }
            for r in hits
        ],
        "front": [
            {
                "trial_id": rows[i]["trial_id"],
                "val_ppl": rows[i]["val_ppl"],
                "val_fwd_nstep": rows[i]["val_fwd_nstep"],
                **{k: rows[i][k] for k in keys},
            }
            for i in res.front
        ],
    }
    print(
        f"   {wall:.0f} s, {out['trials_per_hour']:.0f} trials/h, {steps} steps, "
        f"{out['statuses']}; reference ppl {ref['val_ppl']:.2f} at "
        f"{ref['val_fwd_nstep']:.1f} steps ({ref['status']}; target vs {base['val_ppl']:.2f} at "
        f"{base['val_fwd_nstep']:.1f}); best ppl {out['best_ppl']:.2f}; "
        f"at <= half steps {out['best_ppl_at_half_steps']:.2f}; HV {out['hypervolume']:.0f}; "
        f"target {'met' if out['target_met'] else 'not met'}",
        flush=True,
    )
    return out


def stats(values: list[float]) -> dict:
    vals = [v for v in values if math.isfinite(v)]
    return {
        "values": values,
        "mean": statistics.fmean(vals) if vals else math.nan,
        "min": min(vals, default=math.nan),
        "max": max(vals, default=math.nan),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampler seeds")
    ap.add_argument("--quick", action="store_true", help="4 trials of 100 steps; no file")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--timeout", type=int, default=1200, help="per study, seconds")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import machine_info

    storage = tempfile.mkdtemp(prefix="bench-tune-")
    results: dict = {"machine": machine_info(), "study": str(STUDY.relative_to(ROOT))}
    # the studies stay in `storage` for a look when one fails
    if args.quick:
        q = ["trials=4", "optim.steps=100", "scheduler.grace_period=1"]
        results["quick"] = run_study("quick", q, storage, args.timeout)
        shutil.rmtree(storage, ignore_errors=True)
        return 0
    studies: dict[str, dict] = {}
    s0 = args.seeds[0]
    # first: every trial to the end, the reference's full-run values among them
    studies[f"tpe-none-s{s0}"] = none = run_study(
        f"tpe-none-s{s0}", [f"sampler.seed={s0}", "scheduler={name: none}"], storage, args.timeout
    )
    baseline = none["reference"]
    for seed in args.seeds:
        studies[f"tpe-asha-s{seed}"] = run_study(
            f"tpe-asha-s{seed}", [f"sampler.seed={seed}"], storage, args.timeout, baseline
        )
        studies[f"random-asha-s{seed}"] = run_study(
            f"random-asha-s{seed}",
            [f"sampler={{name: random, seed: {seed}}}"],
            storage,
            args.timeout,
            baseline,
        )
    results["studies"] = studies
    results["baseline"] = baseline
    asha = studies[f"tpe-asha-s{s0}"]
    results["asha_saving"] = {
        "wall_ratio": asha["wall_s"] / none["wall_s"],
        "steps_ratio": asha["train_steps"] / none["train_steps"],
        "best_ppl_asha": asha["best_ppl"],
        "best_ppl_none": none["best_ppl"],
    }
    results["tpe_vs_random"] = {
        name: {
            key: stats([studies[f"{name}-asha-s{s}"][key] for s in args.seeds])
            for key in ("best_ppl", "best_ppl_at_half_steps", "hypervolume", "wall_s")
        }
        for name in ("tpe", "random")
    }
    results["target_met"] = {k: v["target_met"] for k, v in studies.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(json.dumps({k: results[k] for k in ("asha_saving", "tpe_vs_random")}, indent=1))
    print(f"results: {args.out}")
    shutil.rmtree(storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
