"""Segmentation's training split into a 2-worker TorchTrainer: one deqray tree against another.

    git worktree add /tmp/before <commit>
    RAY_ADDRESS=local python benchmarks/bench_segmentation_data.py \
        --trees before=/tmp/before after=. --out benchmarks/results/segmentation_data.json

Each measurement is this script run again (`--measure`) in a fresh process
with its own local Ray and the tree's `deqray` first on PYTHONPATH, the trees
taken in turn, repeat after repeat, so both meet the same machine. What it
measures: the augmented training split of a generated shapes set
(`segmentation_datasets`, the data path of the segmentation task), read for
`--epochs` epochs by 2 Ray Train workers of 0.5 CPU, batch 8, no model:
images/s over the whole run (every epoch's start included) and the wait for
each epoch's first batch, timed in the workers; the fit's own start-up (Ray
Train's workers starting) is outside the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

HERE = os.path.abspath(__file__)


def measure(root: str, epochs: int, crop: int) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from deqray.data.segmentation import segmentation_data_config, segmentation_datasets

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    datasets = segmentation_datasets(
        root, splits=["train"], crop_size=crop, scales=[0.75, 1.0, 1.25], base_size=crop, seed=0
    )

    def loop(config: dict) -> dict:
        shard = ray.train.get_dataset_shard("train")
        firsts, images, start = [], 0, time.perf_counter()
        for _ in range(config["epochs"]):
            t = time.perf_counter()
            for i, batch in enumerate(shard.iter_torch_batches(batch_size=8)):
                if i == 0:
                    firsts.append(time.perf_counter() - t)
                images += batch["image"].shape[0]
        return {"images": images, "seconds": time.perf_counter() - start, "firsts": firsts}

    trainer = TorchTrainer(
        loop,
        train_loop_config={"epochs": epochs},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=datasets,
        dataset_config=segmentation_data_config(["train"]),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="seg-bench-")),
    )
    m = trainer.fit().return_value  # rank 0's; both ranks read half the split each
    ray.shutdown()
    return {
        "images_per_s": 2 * m["images"] / m["seconds"],
        "first_batch_s": m["firsts"],
        "seconds": m["seconds"],
    }


def run_tree(path: str, root: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), RAY_ADDRESS="local")
    cmd = [sys.executable, HERE, "--measure", root, "--epochs", str(args.epochs)]
    cmd += ["--crop", str(args.crop)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", nargs="+", default=["current=."], help="label=path ...")
    p.add_argument("--images", type=int, default=1536, help="training images of the shapes set")
    p.add_argument("--size", type=int, default=64, help="image side of the shapes set")
    p.add_argument("--crop", type=int, default=48)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.epochs, args.crop)))
        return

    from deqray.data.shapes import write_shapes

    root = os.path.join(tempfile.mkdtemp(prefix="seg-bench-data-"), "shapes")
    write_shapes(
        None,
        root,
        train_images=args.images,
        test_images=8,
        size=args.size,
        shard_mb=0.25,
        progress=False,
    )
    trees = dict(t.split("=", 1) for t in args.trees)
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    for r in range(args.repeats):
        for label, path in trees.items():
            runs[label].append(run_tree(path, root, args))
            m = runs[label][-1]
            firsts = ", ".join(f"{x:.2f}" for x in m["first_batch_s"])
            print(
                f"repeat {r} {label:>10}: {m['images_per_s']:7.1f} images/s, "
                f"first batches {firsts} s",
                flush=True,
            )
    summary = {}
    for label, ms in runs.items():
        summary[label] = {
            "images_per_s_median": statistics.median(m["images_per_s"] for m in ms),
            "first_batch_s_median": [
                statistics.median(m["first_batch_s"][e] for m in ms) for e in range(args.epochs)
            ],
        }
        s = summary[label]
        print(
            f"{label:>10}: median {s['images_per_s_median']:.1f} images/s, first batch per "
            f"epoch {', '.join(f'{x:.2f}' for x in s['first_batch_s_median'])} s"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "date": date.today().isoformat(),
                    "machine": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPUs",
                    "args": vars(args),
                    "runs": runs,
                    "summary": summary,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
