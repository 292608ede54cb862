"""The s3:// train/resume path against the local one: the same run, data and run directory on
an S3-protocol server, or both on the local disk, side by side in one process.

    python benchmarks/bench_storage.py              # ~6 min on 2 cores; results/storage_cpu.json
    python benchmarks/bench_storage.py --repeats 1 --out none     # a quick look

The server is the tests' (tests/s3_server.py): moto on 127.0.0.1 behind
socat, reached through AWS_ENDPOINT_URL as a user would. It is a stand-in
for the protocol path (pyarrow's S3 client, deqray's atomic writes, Ray
Train's storage context), not for a real store's latency or bandwidth.

Each repeat runs, for local then s3:// (alternating which goes first), a
2-worker DEQ-Transformer run on the preprocessed Markov corpus: `train`
(to `train.stop_at_step`, checkpointing at every evaluation) and `resume`
(the same name, from its last checkpoint to the end). Both are timed whole
(driver wall time: Ray Train's start, the data, the steps, the end), and a
hook in rank 0 times the storage parts: each checkpoint's save
(torch.save + upload), each metrics.jsonl append, each TensorBoard flush,
and the restore of the checkpoint (read + load) in the resumed run.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deqray.train.hooks import Hooks  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "storage_cpu.json"
MARKOV = {"tokens": 60000, "vocab_size": 100, "branching": 8, "seed": 3, "shard_tokens": 5000}
PARTS = ("save_state", "append_metrics", "tensorboard")


class StorageTimer(Hooks):
    """Rank 0's storage parts, appended as JSON lines to a local file."""

    def __init__(self, out: str):
        self.out = out
        self.rank = 0
        self._restore = 0.0

    def on_event(self, name, **info):
        if name == "start":
            import ray.train

            self.rank = ray.train.get_context().get_world_rank()
        elif name == "restore_start":
            self._restore = time.perf_counter()
        elif name == "restored":
            self._write("restore", time.perf_counter() - self._restore)

    @contextlib.contextmanager
    def phase(self, name):
        t = time.perf_counter()
        yield
        if name in PARTS:
            self._write(name, time.perf_counter() - t)

    def _write(self, part, seconds):
        if self.rank == 0:
            with open(self.out, "a") as fh:
                fh.write(json.dumps({"part": part, "s": seconds}) + "\n")


def one(kind: str, data: str, storage: str, args, tmp: Path, i: int) -> dict:
    from deqray.train.driver import fit

    overrides = [
        f"data.source={data}",
        f"optim.steps={args.steps}",
        f"train.eval_every={args.every}",
        "train.eval_batches=4",
        "train.pretrain_steps=10",
        "optim.warmup_steps=0",
        "train.log_every=100000",
        "checkpoint.keep=2",
    ]
    parts = tmp / f"{kind}-{i}.jsonl"
    name = f"{kind}-{i}"
    timing = {"load_1min": os.getloadavg()[0]}  # the machine is shared: say how busy it was
    for stage, extra in (("train", [f"train.stop_at_step={args.steps // 2}"]), ("resume", [])):
        before = parts.read_text().count("\n") if parts.exists() else 0
        t = time.perf_counter()
        result = fit(
            "markov-tiny",
            overrides + extra,
            workers=2,
            storage=storage,
            name=name,
            verbose=False,
            hooks=[StorageTimer(str(parts))],
        )
        timing[f"{stage}_s"] = time.perf_counter() - t
        assert result.return_value["status"] == ("stopped" if extra else "finished"), result
        rows = [json.loads(x) for x in parts.read_text().splitlines()[before:]]
        for part in (*PARTS, "restore"):
            got = [r["s"] for r in rows if r["part"] == part]
            if got:
                timing.setdefault(part, []).extend(got)
    return timing


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("train_s", "resume_s"):
        out[key] = statistics.median(r[key] for r in runs)
    for part in (*PARTS, "restore"):
        values = [v for r in runs for v in r.get(part, [])]
        out[f"{part}_s"] = statistics.median(values) if values else None
        out[f"{part}_n"] = len(values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80, help="the whole run (train: half of it)")
    ap.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    ap.add_argument("--out", default=str(OUT), help="results JSON, or 'none'")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="deqray-bench-storage-"))
    server = S3Server().start()
    os.environ.update(server.env)  # before Ray starts: its workers inherit the settings
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook, to the workers
    try:
        ray.init(
            num_cpus=2,
            resources={"TRAIN_DRIVER": 4},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        from deqray.data import locate
        from deqray.data.markov import write_markov_corpus

        bucket = server.create_bucket()
        places = {
            "local": (str(tmp / "markov"), str(tmp / "runs")),
            "s3": (f"{bucket}/markov", f"{bucket}/runs"),
        }
        for data, _ in places.values():
            write_markov_corpus(None, data, progress=False, **MARKOV)
        runs = {k: [] for k in places}
        for i in range(args.repeats):
            order = list(places) if i % 2 == 0 else list(places)[::-1]
            for kind in order:
                data, storage = places[kind]
                print(f"== repeat {i + 1}/{args.repeats}: {kind}", flush=True)
                runs[kind].append(one(kind, data, storage, args, tmp, i))
                print(f"   {runs[kind][-1]['train_s']:.1f} s + {runs[kind][-1]['resume_s']:.1f} s")
        ckpt = next(
            p for p in (tmp / "runs" / "local-0").iterdir() if p.name.startswith("checkpoint_")
        )
        size = locate(str(ckpt / "state.pt")).size()
        report = {
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}",
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/bench_storage.py " + " ".join(sys.argv[1:]),
            "steps": args.steps,
            "checkpoint_every": args.every,
            "checkpoint_bytes": size,
            "repeats": args.repeats,
            "runs": runs,
            "median": {k: summarise(v) for k, v in runs.items()},
        }
        med = report["median"]
        report["ratio_s3_to_local"] = {
            k: med["s3"][k] / med["local"][k]
            for k in med["local"]
            if k.endswith("_s") and med["local"][k] and med["s3"][k] is not None
        }
        print(json.dumps({k: report[k] for k in ("median", "ratio_s3_to_local")}, indent=1))
        if args.out != "none":
            Path(args.out).write_text(json.dumps(report, indent=1))
            print(f"results: {args.out}")
    finally:
        ray.shutdown()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
