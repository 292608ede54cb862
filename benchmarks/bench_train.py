"""Ray Train (`deqray.train.fit`) on the CPU: throughput, overhead against a plain loop, resume.

    python benchmarks/bench_train.py             # ~8 min on 2 cores; results/train_cpu.json
    python benchmarks/bench_train.py --quick     # ~2 min smoke run; writes no file

Two workloads, the shipped laptop configs in DEQ mode from the first step
(`train.pretrain_steps=0`): the DEQ-Transformer on the embedded Markov
corpus (`markov-tiny`, tokens/s) and MDEQ on the 8x8 digits (`digits-tiny`,
images/s). What is measured:

1. Throughput of `fit()` with 1 and 2 workers (0.5 CPU each, the default on
   a CPU; the same global batch), in steady state: evaluation only at the
   end (`train.eval_every` = steps, `train.eval_batches=1`), the first
   `--warmup` steps and the step that evaluates left out. The clock is rank
   0's: the probe, subscribed to the worker loop's hooks
   (`deqray.train.hooks`), stamps the moment the loop asks for each batch,
   so a step's time includes waiting for data and the loop's own
   bookkeeping, not only the `step_time` metric (forward, backward,
   optimiser), which is reported beside it. "steady" leaves out the first
   step of each epoch, where the Ray loop waits for a new pass of the data
   pipeline to start; "with epoch starts" keeps it.
2. The overhead of that loop at 1 worker against a plain single-process
   loop written here, run in a fresh Python process while Ray idles: the
   same step function (`deqray.train.step.train_step`), model config,
   initial weights, optimiser and schedule, the same batches (LM: the parquet
   tokens cut into the same lanes, memory carried; digits: the PNGs decoded
   once into one tensor), the same steps and the torch thread count a Ray
   worker gets. Ray and plain runs alternate (A B A B ...); the ratio of
   mean wall time per step over the same window is reported per pair
   (median and range). Equal mean solver steps on both sides show that they
   did the same work.
3. Time to resume after a worker dies (`debug.fail_at_step`, one restore
   allowed): from the fault marker's mtime (written just before the exit)
   to the restored worker's first finished step, split into its phases,
   and the steps redone since the last checkpoint.

The probe also times the loop's parts (data wait, the step, info.metrics(),
TrainStats.add, evaluation, checkpoint, ray.train.report, ...) for the
overhead breakdown; its own cost is a few perf_counter() calls per step.
Machines are often shared: a sampler of /proc records the cores that
processes outside this benchmark used during each measurement, and each
run first waits (up to --quiet-wait s) for them to fall below
--quiet-threshold cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import date, datetime

# Before Ray is imported anywhere: a report otherwise blocks ~2 s on a health
# check poll (which would also delay noticing a dead worker), and the local
# instance needs no token (docs/ray-notes.md, "Clusters and jobs").
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deqray.train.hooks import Hooks  # noqa: E402

WORKLOADS = {
    "lm": {"config": "markov-tiny", "unit": "tokens"},
    "vision": {"config": "digits-tiny", "unit": "images"},
}
PROBE_DIR = "_bench"  # in the run directory: what the wrapper saw, one JSON per worker attempt


# --------------------------------------------------------------------------- #
# machine
# --------------------------------------------------------------------------- #


def machine_info() -> dict:
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": str(date.today()),
        "started": datetime.now().isoformat(timespec="seconds"),
        "env": {
            k: os.environ.get(k)
            for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
    }


def worker_threads() -> dict:
    """torch.get_num_threads() in Ray actors of 0.5, 1 and 2 CPUs (what Ray's OMP default gives)."""
    import ray

    @ray.remote
    class Threads:
        def get(self):
            return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    out = {}
    for cpus in (0.5, 1.0, 2.0):
        actor = Threads.options(num_cpus=cpus).remote()
        n, omp = ray.get(actor.get.remote())
        ray.kill(actor)
        out[str(cpus)] = {"torch_threads": n, "OMP_NUM_THREADS": omp}
    return out


# --------------------------------------------------------------------------- #
# the probe: runs inside each Ray Train worker, around deqray's own loop
# --------------------------------------------------------------------------- #


class Probe(Hooks):
    """The worker loop's hooks, timing each training iteration (from one batch request to
    the next) and its parts, and stamping the worker's start-up and restore.

    Only the outermost timed phase counts, so that e.g. the solver statistics
    inside an evaluation are part of "evaluate", not "metrics". Each worker
    writes what it saw to <run>/_bench/ at the end of its loop.
    """

    PARTS = {"tensorboard": "tb", "report": "ray_report", "gather": "gather_to_rank0"}

    def __init__(self):
        self.iters: list[dict] = []
        self.cur: dict | None = None
        self.depth = 0
        self.info: dict = {}
        self.run_uri: str | None = None

    def on_event(self, name: str, **info) -> None:
        now = time.time()
        if name == "start":
            import ray.train

            ctx = ray.train.get_context()
            self.run_uri = info["run_uri"]
            self.info.update(
                wall_enter=now,
                wall_fn_start=now,
                rank=ctx.get_world_rank(),
                world=ctx.get_world_size(),
                pid=os.getpid(),
                torch_threads=torch.get_num_threads(),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
            )
        elif name == "model_built":
            self.info["wall_model_built"] = now
        elif name == "model_prepared":
            self.info["wall_model_prepared"] = now
        elif name == "checkpoint_found":
            self.info.setdefault("wall_got_checkpoint", now)
            self.info["restored"] = info["restored"]
        elif name == "restore_start":  # the checkpoint is a local directory now
            self.info["wall_load_start"] = now
        elif name == "restored":
            self.info.update(restored_step=info["step"], wall_restored=now)
        elif name == "data_end":  # no step: its time belongs to the step before
            self.iters.pop()
            self.cur = self.iters[-1] if self.iters else None

    @contextlib.contextmanager
    def phase(self, name: str):
        if name == "data":
            self.cur = {"t": time.perf_counter(), "wall": time.time()}
            self.iters.append(self.cur)
        if self.depth:
            yield
            return
        self.depth += 1
        t = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            if self.cur is not None:
                key = self.PARTS.get(name, name)
                self.cur[key] = self.cur.get(key, 0.0) + time.perf_counter() - t

    def on_step(self, step: int, result, metrics: dict) -> None:
        if self.cur is not None:
            self.cur["step_s"] = result.seconds  # the loop's own step time
            self.cur["wall_step_end"] = time.time()
            self.cur["fwd_nstep"] = metrics.get("fwd_nstep")
            self.cur["bwd_nstep"] = metrics.get("bwd_nstep")

    def on_end(self) -> None:
        self.info["end"] = time.perf_counter()
        out = os.path.join(self.run_uri, PROBE_DIR)
        os.makedirs(out, exist_ok=True)
        name = f"rank{self.info['rank']}-{os.getpid()}-{time.time_ns()}.json"
        with open(os.path.join(out, name), "w") as fh:
            json.dump({"info": self.info, "iters": self.iters}, fh)


def read_probes(run_dir: str) -> list[dict]:
    d = os.path.join(run_dir, PROBE_DIR)
    if not os.path.isdir(d):
        return []
    return [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))]


def iteration_seconds(probe: dict) -> list[float]:
    """Wall time of each iteration: to the next batch request (the last: to the loop's end)."""
    ts = [it["t"] for it in probe["iters"]] + [probe["info"]["end"]]
    return [b - a for a, b in zip(ts, ts[1:], strict=False)]


# --------------------------------------------------------------------------- #
# other people's CPU: the machine may be shared (other sessions' tests)
# --------------------------------------------------------------------------- #

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _scan() -> dict[int, tuple[str, int, float]]:
    """{pid: (name, parent pid, CPU seconds)} of every process (about 1 ms)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        head, rest = text.rsplit(")", 1)
        f = rest.split()  # state ppid ... utime(11) stime(12)
        out[int(pid)] = (head.split("(", 1)[1], int(f[1]), (int(f[11]) + int(f[12])) / _TICK)
    return out


class CpuMeter:
    """Who used the CPUs while a measurement ran: processes outside this benchmark's tree
    (e.g. other people's tests on a shared machine) and this benchmark's own (Ray's).

    A thread samples /proc every `interval` s. A process counts from its first
    sighting (zero if it was born after the first sample) to its last, so CPU
    a process used after its last sample is lost, never given to someone else.
    """

    def __init__(self, interval: float = 1.0, root: int | None = None):
        self.interval = interval
        self.root = root or os.getpid()  # the benchmark's first process
        self.samples: list[tuple[float, dict]] = []
        self.mine: set[int] = set()
        self._stop = threading.Event()

    def _sample(self) -> None:
        procs = _scan()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            self.mine.add(pid)
            todo += children.get(pid, [])
        self.samples.append((time.time(), procs))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def usage(self, t0: float | None = None, t1: float | None = None) -> dict:
        """Cores used over the samples spanning wall times [t0, t1] (default: all)."""
        s = self.samples
        i = max([k for k, (t, _) in enumerate(s) if t0 is not None and t <= t0] or [0])
        j = min([k for k, (t, _) in enumerate(s) if t1 is not None and t >= t1] or [len(s) - 1])
        j = min(max(j, i + 1), len(s) - 1)
        first, last, name = {}, {}, {}
        for _, procs in s[i : j + 1]:
            for pid, (comm, _, cpu) in procs.items():
                first.setdefault(pid, cpu if procs is s[i][1] else 0.0)
                last[pid] = cpu
                name[pid] = comm
        dt = max(s[j][0] - s[i][0], 1e-9)
        others, mine = 0.0, {}
        for pid, cpu in last.items():
            used = max(0.0, cpu - first[pid]) / dt
            if pid in self.mine:
                mine[name[pid]] = mine.get(name[pid], 0.0) + used
            else:
                others += used
        top = dict(
            sorted(((k, round(v, 3)) for k, v in mine.items() if v >= 0.01), key=lambda kv: -kv[1])
        )
        return {
            "seconds": dt,
            "others_cores": others,
            "mine_cores": sum(mine.values()),
            "mine_by_process": top,
        }


def wait_quiet(threshold: float, max_wait: float) -> dict:
    """Wait (at most max_wait s) until others use < threshold cores over 1 s; what was seen."""
    t0 = time.perf_counter()
    while True:
        with CpuMeter() as meter:
            time.sleep(1.0)
        others = meter.usage()["others_cores"]
        waited = time.perf_counter() - t0
        if others < threshold or waited >= max_wait:
            if others >= threshold:
                print(f"  (others still use {others:.2f} cores after {waited:.0f} s)", flush=True)
            return {"others_cores_before": others, "waited_s": waited}


# --------------------------------------------------------------------------- #
# Ray side
# --------------------------------------------------------------------------- #


def ray_fit(config: str, overrides: list[str], workers: int, storage: str, verbose: bool):
    """fit() with the probe's hooks in every worker; (result, run dir, driver seconds, CpuMeter)."""
    from deqray.train.driver import fit

    if __name__ != "__main__":
        # the workers cannot import this file: ship the probe by value, as for __main__
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t = time.perf_counter()
    with CpuMeter() as meter:
        result = fit(
            config, overrides, workers=workers, storage=storage, verbose=verbose, hooks=[Probe()]
        )
    return result, result.path, time.perf_counter() - t, meter


PARTS = (
    "data",
    "step_s",
    "metrics",
    "stats_add",
    "progress_line",
    "evaluate",
    "stats_reduce",
    "gather_to_rank0",
    "append_metrics",
    "tb",
    "save_state",
    "ray_report",
)


def windows(lo: int, hi: int, per_epoch: int) -> dict[str, list[int]]:
    """Iteration indices (iteration i takes step i + 1) of the two steady windows.

    "steady": lo..hi-1 without the first iteration of an epoch (where the Ray
    loop waits for a new pass of the data pipeline to start); "with_epochs":
    all of lo..hi-1, epoch starts included.
    """
    every = list(range(lo, hi))
    return {"steady": [i for i in every if i % per_epoch], "with_epochs": every}


def _stats(secs: list[float]) -> dict:
    return {
        "steps": len(secs),
        "iter_mean_s": statistics.fmean(secs),
        "iter_median_s": statistics.median(secs),
    }


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def ray_summary(run_dir: str, win: dict[str, list[int]], items: int) -> dict:
    """Rank 0's iterations over the windows, where the time went, and the final report's cost."""
    probes = [p for p in read_probes(run_dir) if not p["info"].get("restored")]
    by_rank = {p["info"]["rank"]: p for p in probes}
    p0 = by_rank[0]
    secs = iteration_seconds(p0)
    iters = p0["iters"]
    out: dict = {"torch_threads": p0["info"]["torch_threads"]}
    out["OMP_NUM_THREADS"] = p0["info"]["OMP_NUM_THREADS"]
    out["ranks"] = sorted(by_rank)
    for name, idx in win.items():
        idx = [i for i in idx if i < len(secs)]
        w = _stats([secs[i] for i in idx])
        w["step_time_mean_s"] = statistics.fmean(iters[i].get("step_s", 0.0) for i in idx)
        w["data_wait_mean_s"] = statistics.fmean(iters[i].get("data", 0.0) for i in idx)
        w["steps_per_s"] = 1 / w["iter_mean_s"]
        w["items_per_s"] = items / w["iter_mean_s"]
        w["items_per_s_step_time_only"] = items / w["step_time_mean_s"]
        parts = {k: statistics.fmean(iters[i].get(k, 0.0) for i in idx) for k in PARTS}
        # the parts below run outside the loop's timed step
        outside = sum(v for k, v in parts.items() if k != "step_s")
        parts["unaccounted"] = w["iter_mean_s"] - parts["step_s"] - outside
        w["parts_mean_s"] = parts
        w["fwd_nstep_mean"] = _mean(iters[i].get("fwd_nstep") for i in idx)
        w["bwd_nstep_mean"] = _mean(iters[i].get("bwd_nstep") for i in idx)
        out[name] = w
    out["first_iter_s"] = secs[0]  # the data pipeline's start
    steady = win["steady"]
    out["window_wall"] = [
        iters[steady[0]]["wall"],
        iters[min(steady[-1] + 1, len(iters) - 1)]["wall"],
    ]
    last = iters[-1]
    # the final step's iteration: the step, then evaluation, checkpoint and report
    out["report_iteration_s"] = secs[-1]
    out["report_parts_s"] = {
        k: last.get(k, 0.0)
        for k in (
            "evaluate",
            "stats_reduce",
            "gather_to_rank0",
            "append_metrics",
            "tb",
            "save_state",
            "ray_report",
        )
    }
    out["epoch_start_data_wait_s"] = [
        iters[i].get("data", 0.0)
        for i in range(1, len(iters))
        if i not in win["steady"] and i in win["with_epochs"]
    ]
    return out


# --------------------------------------------------------------------------- #
# the plain loop (a fresh Python process, no Ray)
# --------------------------------------------------------------------------- #


def plain_data(workload: str, run):
    """The batches the Ray loop trains on at 1 worker, as step -> (batch, new pass)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deqray.data import load_manifest
    from deqray.data._fs import locate

    def read(uri, columns):
        loc = locate(uri)
        with loc.fs.open_input_file(loc.path) as fh:
            return pq.read_table(fh, columns=columns)

    manifest = load_manifest(run.plan.root)
    split = run.train_split
    per_epoch = run.steps_per_epoch
    B = run.batching.batch_per_worker
    if workload == "lm":
        from deqray.data.lm import LMBatch

        col = manifest.meta.get("column", "token")
        tokens = np.concatenate(
            [read(u, [col]).column(0).to_numpy() for u in manifest.shard_uris(split)]
        ).astype(np.int64)
        # deqray.data.lm's layout for one worker: B lanes of lane_len inputs, each
        # reading one token more for its last target; row b of a batch continues
        # row b of the one before, as the Transformer-XL memory expects
        lane_len = (len(tokens) - 1) // B
        lanes = np.stack([tokens[b * lane_len : (b + 1) * lane_len + 1] for b in range(B)])
        lanes = torch.from_numpy(lanes)
        T = run.plan.details.tgt_len

        def lm_batch(step):
            i = step % per_epoch
            n = min(T, lane_len - i * T)
            seg = lanes[:, i * T : i * T + n + 1]
            x, y = seg[:, :-1].contiguous(), seg[:, 1:].contiguous()
            return LMBatch(x, y, torch.arange(B) * lane_len + i * T), i == 0

        return lm_batch

    from deqray.data.vision import DecodeTransform, transform_options

    table = pa.concat_tables([read(u, ["image", "label"]) for u in manifest.shard_uris(split)])
    # what the task asks for when data.augment is false: the whole image, no flip
    opts = transform_options(
        manifest,
        True,
        size=run.plan.details.image_size,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip=0.0,
    )
    decoded = DecodeTransform(**opts)(
        {
            "image": np.array(table.column("image").to_pylist(), dtype=object),
            "label": table.column("label").to_numpy(),
        }
    )
    images = torch.from_numpy(decoded["image"])
    labels = torch.tensor(decoded["label"], dtype=torch.int64)

    def vision_batch(step):
        i = step % per_epoch
        return (images[i * B : (i + 1) * B], labels[i * B : (i + 1) * B]), i == 0

    return vision_batch


def plain_run(run, steps, threads, batches, deadline=None, root=None) -> dict:
    """The loop one writes without Ray, calling deqray's own step function (forward, Jacobian
    term, backward, clip, optimiser, schedule); per-step walls.

    deadline: stop after this many seconds (an oversubscribed machine can make
    a many-thread run crawl).
    """
    from deqray.train.state import make_optimizer, make_scheduler
    from deqray.train.step import train_step

    cfg = run.experiment
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the worker loop's seeding: the initial weights, then rank 0's stream
        torch.manual_seed(cfg.train.seed)
        model = run.task.build_model(run)
        torch.manual_seed(cfg.train.seed * 1000 + 1)
        model.train()
        optimizer = make_optimizer(model.parameters(), cfg.optim)
        scheduler = make_scheduler(optimizer, cfg.optim, run.total_steps)
        state = None
        stamps, nsteps, bsteps = [], [], []
        with CpuMeter(root=root) as meter:
            start = time.perf_counter()
            for step in range(steps):
                stamps.append(time.perf_counter())
                if deadline is not None and stamps[-1] - start > deadline:
                    break
                batch, new_pass = batches(step)
                if new_pass:
                    state = run.task.state_at_epoch_start()
                r = train_step(run, model, optimizer, scheduler, batch, state, step=step)
                state = r.state
                # tensors only, no float() per step: the solver's work, compared afterwards
                nsteps.append(r.info.nstep)
                if r.info.backward.result is not None:
                    bsteps.append(r.info.backward.result.nstep)
            else:
                stamps.append(time.perf_counter())
        return {
            "iters": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "fwd_nstep": [float(n.float().mean()) for n in nsteps],
            "bwd_nstep": [float(n.float().mean()) for n in bsteps] or None,
            "final_loss": r.loss,
            "cpu": meter.usage(),
        }
    finally:
        torch.set_num_threads(saved_threads)


def _plain_child(workload, config, overrides, steps, threads, deadline, root) -> dict:
    from deqray.config import load_config
    from deqray.train.context import plan_run

    run = plan_run(load_config(config, overrides))  # the data was generated already: only read
    batches = plain_data(workload, run)
    return plain_run(run, steps, threads, batches, deadline, root)


def plain_fresh(workload, config, overrides, steps, threads, deadline=None) -> dict:
    """plain_run in a new Python process, as `python train.py` would run it.

    A Ray worker is a fresh process too; the driver, after minutes of Ray
    bookkeeping, is not (run in it, the plain loop's steps got up to 15%
    slower from the first repeat to the last).
    """
    import multiprocessing

    args = (workload, config, overrides, steps, threads, deadline, os.getpid())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_plain_child, args)


def plain_summary(run: dict, win: dict[str, list[int]], items: int) -> dict:
    out: dict = {"cpu": run["cpu"], "final_loss": run["final_loss"]}
    for name, idx in win.items():
        idx = [i for i in idx if i < len(run["iters"])]
        w = _stats([run["iters"][i] for i in idx])
        w["steps_per_s"] = 1 / w["iter_mean_s"]
        w["items_per_s"] = items / w["iter_mean_s"]
        w["fwd_nstep_mean"] = statistics.fmean(run["fwd_nstep"][i] for i in idx)
        if run["bwd_nstep"]:
            w["bwd_nstep_mean"] = statistics.fmean(run["bwd_nstep"][i] for i in idx)
        out[name] = w
    return out


# --------------------------------------------------------------------------- #
# the three measurements
# --------------------------------------------------------------------------- #


def common_overrides(cache: str, steps: int) -> list[str]:
    return [
        f"data.cache={cache}",
        f"optim.steps={steps}",
        "train.pretrain_steps=0",
        f"train.eval_every={steps}",  # one evaluation, at the end (outside the window)
        "train.eval_batches=1",
    ]


def throughput_and_overhead(task: str, args, tmp: str, cache: str) -> dict:
    from deqray.config import load_config
    from deqray.train.context import plan_run
    from deqray.train.driver import read_metrics

    w = WORKLOADS[task]
    steps = args.lm_steps if task == "lm" else args.vision_steps
    over = common_overrides(cache, steps)
    cfg = load_config(w["config"], over)
    runs = {n: plan_run(cfg.with_overrides({"scaling.workers": n})) for n in (1, 2)}
    per_epoch = {n: r.steps_per_epoch for n, r in runs.items()}
    items = runs[1].plan.items_per_step
    lo, hi = args.warmup, steps - 1  # the last step evaluates and reports: left out
    out: dict = {
        "config": w["config"],
        "overrides": over,
        "steps": steps,
        "window_steps": [lo + 1, hi],  # 1-based steps in the window
        "items_per_step": items,
        "unit": w["unit"],
        "global_batch": cfg.optim.batch_size,
        "steps_per_epoch": per_epoch,
        "pairs": [],
    }
    print(
        f"\n== {task} ({w['config']}): {steps} steps, window {lo + 1}..{hi}, "
        f"epochs of {per_epoch[1]} steps",
        flush=True,
    )

    def ray_once(workers: int) -> dict:
        gate = wait_quiet(args.quiet_threshold, args.quiet_wait)
        result, run_dir, wall, meter = ray_fit(w["config"], over, workers, tmp, args.verbose)
        status = (result.return_value or {}).get("status")
        if status != "finished":
            raise RuntimeError(f"{task} run with {workers} worker(s) ended {status}: {run_dir}")
        s = ray_summary(run_dir, windows(lo, hi, per_epoch[workers]), items)
        last = read_metrics(run_dir)[-1]
        s.update(
            workers=workers,
            fit_wall_s=wall,
            cpu_fit=meter.usage(),
            cpu=meter.usage(*s["window_wall"]),  # over the steady window only
            gate=gate,
            metric_step_time_s=last.get("step_time"),  # mean over all the run's steps
            metric_items_per_s=last.get("items_per_s"),
            final_train_loss=last.get("train_loss"),
        )
        st = s["steady"]
        print(
            f"  ray {workers}w: {st['iter_mean_s'] * 1e3:7.2f} ms/step (median "
            f"{st['iter_median_s'] * 1e3:.2f}; step_time {st['step_time_mean_s'] * 1e3:.2f}, "
            f"data wait {st['data_wait_mean_s'] * 1e3:.2f}) = {st['items_per_s']:,.0f} "
            f"{w['unit']}/s; with epoch starts {s['with_epochs']['iter_mean_s'] * 1e3:.2f} ms; "
            f"fwd nstep {st['fwd_nstep_mean']:.2f}; fit {wall:.1f} s; others "
            f"{s['cpu']['others_cores']:.2f} cores",
            flush=True,
        )
        print(
            f"    cores used in the window, by process: {s['cpu']['mine_by_process']}", flush=True
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        return s

    win1 = windows(lo, hi, per_epoch[1])
    threads = None
    for rep in range(args.repeats):
        a = ray_once(1)
        threads = a["torch_threads"]
        gate = wait_quiet(args.quiet_threshold, args.quiet_wait)
        b = plain_summary(plain_fresh(task, w["config"], over, steps, threads), win1, items)
        b.update(gate=gate, torch_threads=threads)
        pair = {"repeat": rep, "ray": a, "plain": b}
        for name in win1:
            pair[f"ratio_{name}"] = a[name]["iter_mean_s"] / b[name]["iter_mean_s"]
        pair["ratio_steady_medians"] = a["steady"]["iter_median_s"] / b["steady"]["iter_median_s"]
        print(
            f"  plain ({threads} thread): {b['steady']['iter_mean_s'] * 1e3:7.2f} ms/step "
            f"(median {b['steady']['iter_median_s'] * 1e3:.2f}); fwd nstep "
            f"{b['steady']['fwd_nstep_mean']:.2f}; others {b['cpu']['others_cores']:.2f} cores  "
            f"-> ray/plain {pair['ratio_steady']:.3f} (with epoch starts "
            f"{pair['ratio_with_epochs']:.3f})",
            flush=True,
        )
        out["pairs"].append(pair)
    ov: dict = {"target": 1.05, "plain_torch_threads": threads, "pairs": len(out["pairs"])}
    for key in ("ratio_steady", "ratio_with_epochs", "ratio_steady_medians"):
        r = [p[key] for p in out["pairs"]]
        ov[key] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    ov["met_steady"] = ov["ratio_steady"]["median"] <= 1.05
    ov["met_with_epochs"] = ov["ratio_with_epochs"]["median"] <= 1.05
    out["overhead"] = ov
    out["ray_1_worker"] = _median_run([p["ray"] for p in out["pairs"]])
    out["plain_1_thread"] = _median_run([p["plain"] for p in out["pairs"]])
    out["ray_2_workers"] = ray_once(2)
    out["scaling_2_over_1"] = (
        out["ray_2_workers"]["steady"]["items_per_s"] / out["ray_1_worker"]["steady"]["items_per_s"]
    )
    if args.plain_all_cores:
        # the plain loop with every core: what one process could get from this machine
        cores = len(os.sched_getaffinity(0))
        gate = wait_quiet(args.quiet_threshold, args.quiet_wait)
        run = plain_fresh(task, w["config"], over, steps, cores, deadline=args.plain_deadline)
        b = plain_summary(run, win1, items)
        b.update(torch_threads=cores, steps_run=len(run["iters"]), gate=gate)
        out["plain_all_cores"] = b
        print(
            f"  plain ({cores} threads): {b['steady']['iter_mean_s'] * 1e3:7.2f} ms/step over "
            f"{b['steady']['steps']} steps; others {b['cpu']['others_cores']:.2f} cores",
            flush=True,
        )
    return out


def _median_run(runs: list[dict]) -> dict:
    """The run whose steady mean step time is the median one (a real run, not a blend)."""
    ordered = sorted(runs, key=lambda r: r["steady"]["iter_mean_s"])
    return ordered[(len(ordered) - 1) // 2]


def resume(task: str, workers: int, args, tmp: str, cache: str) -> dict:
    """Kill rank 0 at step K; time from its death to the restored run's first step."""
    from deqray.train.files import METRICS_FILE

    w = WORKLOADS[task]
    K, E, S = args.fail_at, args.fail_every, args.fail_steps
    over = [
        f"data.cache={cache}",
        f"optim.steps={S}",
        "train.pretrain_steps=0",
        f"train.eval_every={E}",
        "train.eval_batches=1",
        f"debug.fail_at_step={K}",
        "checkpoint.max_failures=1",
    ]
    gate = wait_quiet(args.quiet_threshold, args.quiet_wait)
    result, run_dir, wall, meter = ray_fit(w["config"], over, workers, tmp, args.verbose)
    status = (result.return_value or {}).get("status")
    marker = os.path.join(run_dir, "_faults", f"step-{K}")
    if status != "finished" or not os.path.exists(marker):
        raise RuntimeError(f"resume run ({workers} workers) ended {status}: {run_dir}")
    died = os.path.getmtime(marker)
    restored = [p for p in read_probes(run_dir) if p["info"].get("restored")]
    r0 = next(p for p in restored if p["info"]["rank"] == 0)
    first = r0["iters"][0]
    resumed_at = r0["info"]["restored_step"]
    with open(os.path.join(run_dir, METRICS_FILE)) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    before = [r for r in rows if r["time"] < died]
    after = [r for r in rows if r["time"] >= died]
    last_ckpt = (K // E) * E  # the newest checkpoint reported before the death
    reports = [it["ray_report"] for it in r0["iters"] if "ray_report" in it]
    out = {
        "config": w["config"],
        "workers": workers,
        "overrides": over,
        "fail_at_step": K,
        "last_checkpoint_reported_step": last_ckpt,
        "resumed_at_step": resumed_at,
        "steps_redone": K - resumed_at,
        # how long before the death the newest checkpoint's report went out
        "last_report_before_death_s": died - before[-1]["time"] if before else None,
        # phases, in seconds after the marker was written (just before the exit)
        "worker_fn_started_s": min(p["info"]["wall_fn_start"] for p in restored) - died,
        "worker_loop_started_s": min(p["info"]["wall_enter"] for p in restored) - died,
        "model_built_s": r0["info"]["wall_model_built"] - died,
        "model_prepared_s": r0["info"]["wall_model_prepared"] - died,
        "got_checkpoint_s": r0["info"]["wall_got_checkpoint"] - died,
        "load_started_s": r0["info"]["wall_load_start"] - died,
        "checkpoint_loaded_s": r0["info"]["wall_restored"] - died,
        "first_batch_s": first["wall"] + first.get("data", 0.0) - died,
        "first_step_done_s": first["wall_step_end"] - died,
        # back where it died: step K taken again
        "back_at_failed_step_s": r0["iters"][K - resumed_at - 1]["wall_step_end"] - died,
        "first_report_after_restore_s": after[0]["time"] - died if after else None,
        "first_report_step": after[0]["step"] if after else None,
        # a report waits while the controller has not yet taken the previous one
        "ray_report_mean_s": statistics.fmean(reports) if reports else None,
        "fit_wall_s": wall,
        "cpu": meter.usage(),
        "gate": gate,
    }
    print(
        f"  resume {task} {workers}w: died at step {K}, resumed at {resumed_at} "
        f"({K - resumed_at} redone; newest checkpoint reported: {last_ckpt}); worker fn started "
        f"+{out['worker_fn_started_s']:.2f} s, checkpoint loaded "
        f"+{out['checkpoint_loaded_s']:.2f} s, first batch +{out['first_batch_s']:.2f} s, "
        f"first step done +{out['first_step_done_s']:.2f} s, step {K} done again "
        f"+{out['back_at_failed_step_s']:.2f} s; others "
        f"{out['cpu']['others_cores']:.2f} cores",
        flush=True,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def table(report: dict) -> str:
    lines = [
        "| workload | run | ms/step (wall) | step_time ms | data wait ms | steps/s | items/s "
        "| ms/step with epoch starts |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["tasks"].values():
        rows = [
            ("Ray Train, 1 worker", r["ray_1_worker"]),
            ("Ray Train, 2 workers", r["ray_2_workers"]),
            (f"plain loop, {r['overhead']['plain_torch_threads']} thread", r["plain_1_thread"]),
        ]
        if "plain_all_cores" in r:
            rows.append(
                (
                    f"plain loop, {r['plain_all_cores']['torch_threads']} threads",
                    r["plain_all_cores"],
                )
            )
        for label, x in rows:
            st = x["steady"]
            lines.append(
                f"| {r['config']} | {label} | {_ms(st['iter_mean_s'])} | "
                f"{_ms(st.get('step_time_mean_s'))} | {_ms(st.get('data_wait_mean_s'))} | "
                f"{st['steps_per_s']:.1f} | {st['items_per_s']:,.0f} {r['unit']}/s | "
                f"{_ms(x['with_epochs']['iter_mean_s'])} |"
            )
    lines += [
        "",
        "| workload | Ray 1 worker / plain, steady: median [min, max] | with epoch starts "
        "| <= 1.05 (steady / with epochs) |",
        "|---|---|---|---|",
    ]
    for r in report["tasks"].values():
        o = r["overhead"]
        s, e = o["ratio_steady"], o["ratio_with_epochs"]
        lines.append(
            f"| {r['config']} | {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] "
            f"({o['pairs']} pairs) | {e['median']:.3f} [{e['min']:.3f}, {e['max']:.3f}] | "
            f"{'yes' if o['met_steady'] else 'no'} / {'yes' if o['met_with_epochs'] else 'no'} |"
        )
    if report.get("resume"):
        lines += [
            "",
            "| workload | workers | died at step | resumed at | steps redone | seconds after the "
            "death: worker fn starts | model prepared | optimizer built | checkpoint loaded "
            "| first batch | first step done |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in report["resume"]:
            lines.append(
                f"| {x['config']} | {x['workers']} | {x['fail_at_step']} | "
                f"{x['resumed_at_step']} | {x['steps_redone']} | "
                f"{x['worker_fn_started_s']:.2f} | {x['model_prepared_s']:.2f} | "
                f"{x['got_checkpoint_s']:.2f} | {x['checkpoint_loaded_s']:.2f} | "
                f"{x['first_batch_s']:.2f} | {x['first_step_done_s']:.2f} |"
            )
    return "\n".join(lines)


def parts_table(report: dict) -> str:
    tasks = report["tasks"].values()
    head = " | ".join(r["config"] for r in tasks)
    lines = [f"| Ray 1 worker, mean ms per steady step | {head} |", "|---|" + "---:|" * len(tasks)]
    for k in (*PARTS, "unaccounted"):
        vals = [r["ray_1_worker"]["steady"]["parts_mean_s"][k] for r in tasks]
        if any(vals):
            lines.append(f"| {k} | " + " | ".join(f"{v * 1e3:.3f}" for v in vals) + " |")
    vals = [r["plain_1_thread"]["steady"]["iter_mean_s"] for r in tasks]
    lines.append("| (plain loop: whole step) | " + " | ".join(_ms(v) for v in vals) + " |")
    lines += [
        "",
        f"| the final step's evaluation + report, s | {head} |",
        "|---|" + "---:|" * len(tasks),
    ]
    for k in ("evaluate", "save_state", "tb", "ray_report", "gather_to_rank0", "stats_reduce"):
        vals = [r["ray_1_worker"]["report_parts_s"][k] for r in tasks]
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    vals = [r["ray_1_worker"]["epoch_start_data_wait_s"] for r in tasks]
    lines.append(
        "| data wait at an epoch start | "
        + " | ".join(", ".join(f"{v:.2f}" for v in x) or "-" for x in vals)
        + " |"
    )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (fewer steps)")
    ap.add_argument("--tasks", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--lm-steps", type=int, help="markov-tiny steps per run (200; quick 60)")
    ap.add_argument("--vision-steps", type=int, help="digits-tiny steps per run (70; quick 30)")
    ap.add_argument("--warmup", type=int, help="steps left out at the start (20; quick 10)")
    ap.add_argument("--repeats", type=int, help="Ray / plain pairs per workload (5; quick 1)")
    ap.add_argument("--fail-at", type=int, default=25, help="the step at which rank 0 dies")
    ap.add_argument("--fail-every", type=int, default=10, help="eval/checkpoint interval there")
    ap.add_argument("--fail-steps", type=int, default=40, help="steps of the resume runs")
    ap.add_argument("--resume-workers", type=int, nargs="*", help="([1, 2]; quick [1])")
    ap.add_argument(
        "--plain-all-cores",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also the plain loop with every core as torch threads (on; quick off)",
    )
    ap.add_argument("--plain-deadline", type=float, default=30.0, help="its time limit, s")
    ap.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="before each run, wait until other processes use fewer cores than this",
    )
    ap.add_argument("--quiet-wait", type=float, help="... but at most this long, s (120; quick 10)")
    ap.add_argument("--verbose", action="store_true", help="the workers' and fit()'s logs")
    ap.add_argument(
        "--out", help="results JSON (default benchmarks/results/train_cpu.json; none with --quick)"
    )
    args = ap.parse_args()
    q = args.quick

    def default(name, full, quick):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)

    default("lm_steps", 200, 60)
    default("vision_steps", 70, 30)
    default("warmup", 20, 10)
    default("repeats", 5, 1)
    default("resume_workers", [1, 2], [1])
    default("plain_all_cores", True, False)
    default("quiet_wait", 120.0, 10.0)
    out_path = args.out
    if out_path is None and not q:
        here = os.path.dirname(os.path.abspath(__file__))
        out_path = os.path.join(here, "results", "train_cpu.json")
    if min(args.lm_steps, args.vision_steps) - 1 <= args.warmup + 5:
        ap.error("too few steps after the warm-up")

    import ray

    tmp = tempfile.mkdtemp(prefix="deqray-bench-train-")
    cache = os.path.join(tmp, "data")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=args.verbose)
    report: dict = {"machine": machine_info(), "command": " ".join(["python", *sys.argv])}
    try:
        report["settings"] = {
            k: getattr(args, k)
            for k in (
                "quick",
                "lm_steps",
                "vision_steps",
                "warmup",
                "repeats",
                "fail_at",
                "fail_every",
                "fail_steps",
                "resume_workers",
                "quiet_threshold",
                "quiet_wait",
            )
        }
        report["worker_threads_by_cpus"] = threads = worker_threads()
        print(f"torch threads in a Ray actor by its CPUs: {threads}", flush=True)
        report["tasks"] = {t: throughput_and_overhead(t, args, tmp, cache) for t in args.tasks}
        report["resume"] = []
        if args.resume_workers:
            print("\n== resume after a worker failure (markov-tiny)", flush=True)
        for workers in args.resume_workers:
            report["resume"].append(resume("lm", workers, args, tmp, cache))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    report["total_wall_s"] = time.perf_counter() - t0
    m = report["machine"]
    print(
        f"\n{m['date']}, {m['cpu_model']}, {m['cpus_usable']} cores, torch {m['torch']}, "
        f"ray {m['ray']}; {report['command']} ({report['total_wall_s'] / 60:.1f} min)\n",
        flush=True,
    )
    print(table(report))
    print()
    print(parts_table(report))
    if out_path:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
