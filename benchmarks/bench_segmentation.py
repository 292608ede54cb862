"""Segmentation on the CPU: preprocessing throughput, and training throughput of the presets.

    python benchmarks/bench_segmentation.py --out benchmarks/results/segmentation_cpu.json

1. `deqray preprocess cityscapes` on a generated tree in the official layout
   (`--images` pairs of 1024 x 2048 PNGs; label ids drawn from the official
   table), and the embedded shapes set: images/s and MB/s of source read,
   Ray Data start-up included.
2. Training: `shapes-mdeq-tiny` through `deqray.train.fit` (1 worker, DEQ mode
   after `--shapes-pretrain` steps; images/s of the report), and one DEQ-mode
   training step of each Cityscapes preset (`mdeq-cityscapes-small/-large/-xl`,
   their own solver budgets, batch 1) at `--crop` (the reference trains on
   512 x 1024), through the same `train_step` the workers call: seconds per
   step, images/s, forward and backward solver steps.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402


def cityscapes_tree(root: str, images: int) -> int:
    """`images` pairs under leftImg8bit/train and gtFine/train (one city); the bytes written."""
    from cityscapesscripts.helpers.labels import labels
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = np.array([lab.id for lab in labels if lab.id >= 0], dtype=np.uint8)
    total = 0
    for split, n in (("train", images), ("val", max(1, images // 4))):
        img_dir = os.path.join(root, "leftImg8bit", split, "benchcity")
        lab_dir = os.path.join(root, "gtFine", split, "benchcity")
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(lab_dir, exist_ok=True)
        for i in range(n):
            stem = f"benchcity_{i:06d}_000019"
            # blocks of colour and label, so PNG sizes look like real scenes, not noise
            small = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
            rgb = np.kron(small, np.ones((32, 32, 1), dtype=np.uint8))
            label = np.kron(rng.choice(ids, (32, 64)), np.ones((32, 32), dtype=np.uint8))
            a = os.path.join(img_dir, f"{stem}_leftImg8bit.png")
            b = os.path.join(lab_dir, f"{stem}_gtFine_labelIds.png")
            Image.fromarray(rgb).save(a)
            Image.fromarray(label).save(b)
            total += os.path.getsize(a) + os.path.getsize(b)
    return total


def preprocessing(args, tmp: str) -> dict:
    from deqray.data.cityscapes import preprocess_cityscapes
    from deqray.data.shapes import write_shapes

    src = os.path.join(tmp, "cityscapes-src")
    size = cityscapes_tree(src, args.images)
    t = time.perf_counter()
    manifest = preprocess_cityscapes(src, os.path.join(tmp, "cityscapes"), progress=False)
    seconds = time.perf_counter() - t
    n = sum(s.rows for s in manifest.splits.values())
    out = {
        "cityscapes": {
            "images": n,
            "source_mb": size / 1e6,
            "seconds": seconds,
            "images_per_s": n / seconds,
            "mb_per_s": size / 1e6 / seconds,
        }
    }
    t = time.perf_counter()
    shapes = write_shapes(None, os.path.join(tmp, "shapes"), progress=False)
    seconds = time.perf_counter() - t
    n = sum(s.rows for s in shapes.splits.values())
    out["shapes"] = {"images": n, "seconds": seconds, "images_per_s": n / seconds}
    for name, r in out.items():
        print(f"  preprocess {name}: {r['images']} images in {r['seconds']:.1f} s = "
              f"{r['images_per_s']:.1f} images/s", flush=True)  # fmt: skip
    return out


def shapes_training(args, tmp: str) -> dict:
    from deqray.train.driver import fit, read_metrics

    result = fit(
        "shapes-mdeq-tiny",
        [
            f"optim.steps={args.shapes_steps}",
            f"train.pretrain_steps={args.shapes_pretrain}",
            f"train.eval_every={args.shapes_steps}",
            f"data.cache={tmp}/cache",
        ],
        workers=1,
        storage=f"{tmp}/runs",
        verbose=False,
    )
    last = read_metrics(result.path)[-1]
    out = {k: last[k] for k in ("items_per_s", "step_time", "fwd_nstep", "bwd_nstep", "val_miou")}
    ms, miou = out["step_time"] * 1e3, out["val_miou"]
    print(f"  shapes-mdeq-tiny (fit, 1 worker): {out['items_per_s']:.1f} images/s, "
          f"step {ms:.0f} ms, val mIoU {miou:.3f}", flush=True)  # fmt: skip
    return out


def preset_step(preset: str, crop: tuple[int, int], steps: int, threads: int) -> dict:
    from deqray.config import Experiment
    from deqray.tasks import Batching, DataPlan, RunContext
    from deqray.train.state import make_optimizer, make_scheduler
    from deqray.train.step import train_step

    torch.set_num_threads(threads)
    exp = Experiment.from_dict(
        {"task": "segmentation", "model": {"preset": preset}, "optim": {"steps": steps + 1}}
    )
    model_cfg = exp.model_config()
    run = RunContext(exp, exp.get_task(), DataPlan(model_cfg, "train", "val", 1, 1),
                     Batching(1, 1, 1), steps + 1, 0, "")  # fmt: skip
    torch.manual_seed(0)
    model = run.task.build_model(run)
    opt = make_optimizer(model.parameters(), exp.optim)
    sched = make_scheduler(opt, exp.optim, steps + 1)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, *crop, generator=g)
    masks = torch.randint(0, model_cfg.num_classes, (1, *crop), generator=g)
    times, fwd, bwd = [], [], []
    for i in range(steps + 1):  # the first one warms up
        r = train_step(run, model, opt, sched, (images, masks), None, step=i)
        if i:
            times.append(r.seconds)
            fwd.append(float(r.info.nstep.float().mean()))
            bwd.append(float(r.info.backward.result.nstep.float().mean()))
    s = statistics.median(times)
    out = {
        "crop": list(crop),
        "threads": threads,
        "seconds_per_step": s,
        "images_per_s": 1 / s,
        "fwd_nstep": statistics.fmean(fwd),
        "bwd_nstep": statistics.fmean(bwd),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(f"  {preset} at {crop[0]}x{crop[1]}, {threads} thread(s): {s:.2f} s/step "
          f"({out['images_per_s']:.3f} images/s), fwd {out['fwd_nstep']:.1f}, "
          f"bwd {out['bwd_nstep']:.1f} steps", flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="generated Cityscapes training pairs")
    ap.add_argument("--shapes-steps", type=int, default=80)
    ap.add_argument("--shapes-pretrain", type=int, default=20)
    ap.add_argument("--crop", type=int, nargs=2, default=[256, 512], help="H W of a preset step")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per preset (after 1)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--presets", nargs="*", default=["small", "large", "xl"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    report: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "date": str(date.today()),
        },
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["preprocessing"] = preprocessing(args, tmp)
        report["shapes_training"] = shapes_training(args, tmp)
    ray.shutdown()
    report["presets"] = {
        f"mdeq-cityscapes-{p}": [
            preset_step(f"mdeq-cityscapes-{p}", tuple(args.crop), args.steps, t)
            for t in args.threads
        ]  # fmt: skip
        for p in args.presets
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
