"""Ray Data streaming into a 2-worker TorchTrainer against a torch DataLoader, same shards.

    python benchmarks/bench_data.py --out benchmarks/results/data.json

1. Preprocessing throughput (MB/s of raw input): a generated WikiText-format
   corpus (the Markov source) and a generated ImageNet-style folder of JPEGs.
2. Language modelling: (batch, tgt_len) token batches in stream order.
   Ray: `lm_ingest` + TorchTrainer(2 workers, 0.5 CPU each); each worker
   iterates its lanes for one epoch. DataLoader: 2 worker processes building
   the same batches from the same parquet shards. Tokens/s delivered.
3. Vision: decoded and augmented (random-resized crop 224, flip, normalise)
   float32 tensors, `--epochs` passes (each epoch's start counted). Ray:
   `vision_datasets` + TorchTrainer(2 workers) read by `vision_batches`, for
   each `output`: "encoded" (decoded on the workers), "uint8" and "float32"
   (decoded by 2 actors of 0.5 CPU; "float32" is the reader before issue 16).
   DataLoader: 2 worker processes (re-forked each epoch, its default) doing
   the same decode and torchvision transforms on rows of the same shards,
   measured again just before each Ray configuration. Images/s delivered.
Each side is timed from the first request for data to the last batch, in
the consumer(s); "steady" leaves out the waits for each epoch's first batch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date

import numpy as np
import pyarrow.parquet as pq
import torch

from deqray.data import load_manifest


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- language


def make_text(workdir: str, tokens: int) -> str:
    """A WikiText-format corpus from the Markov source, as raw text files."""
    from deqray.data.markov import MarkovParams, random_chain

    src = os.path.join(workdir, "lm_raw")
    if os.path.isdir(src):
        return src
    os.makedirs(src)
    chain = random_chain(MarkovParams(vocab_size=300, seed=0))
    rng = np.random.default_rng(1)
    for split, n in (("train", tokens), ("valid", tokens // 20), ("test", tokens // 20)):
        text = chain.text(chain.sample(n, rng))
        with open(os.path.join(src, f"{split}.txt"), "w") as fh:
            fh.write(text)
    return src


class LaneBatches(torch.utils.data.IterableDataset):
    """The DataLoader peer: the same lanes as deqray's LM reader, built from the shards.

    Each DataLoader worker takes one of the `ranks` lane groups (as a Ray
    Train worker would) and reads the shards itself.
    """

    def __init__(self, root, split, ranks, batch, tgt_len):
        self.uris = load_manifest(root).shard_uris(split)
        self.ranks, self.batch, self.tgt_len = ranks, batch, tgt_len

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rank = info.id if info else 0
        tokens = np.concatenate(
            [pq.read_table(u.replace("file://", "")).column(0).to_numpy() for u in self.uris]
        )
        lane = (len(tokens) - 1) // (self.ranks * self.batch)
        starts = (rank * self.batch + np.arange(self.batch)) * lane
        for pos in range(0, lane, self.tgt_len):
            n = min(self.tgt_len, lane - pos)
            idx = starts[:, None] + pos + np.arange(n + 1)[None, :]
            block = torch.from_numpy(tokens[idx].astype(np.int64))
            yield block[:, :-1], block[:, 1:]


def dataloader_lm(root, batch, tgt_len):
    ds = LaneBatches(root, "train", 2, batch, tgt_len)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    return timed(loader, lambda b: b[0].numel())


def timed(loader, count, epochs=1):
    """(items, seconds, first-batch seconds, items in the first batches), over `epochs` passes."""
    n = first = n_first = seconds = 0
    for _ in range(epochs):
        t = time.perf_counter()
        started = False
        for b in loader:
            k = count(b)
            if not started:
                first, n_first, started = first + time.perf_counter() - t, n_first + k, True
            n += k
        seconds += time.perf_counter() - t
    return n, seconds, first, n_first


def summarize(label, unit, dl, recs):
    """Both sides' overall and steady (after the first batch) rates, and their ratios."""
    n, sec, first, n_first = dl
    dl_rate, dl_steady = n / sec, (n - n_first) / (sec - first)
    total = sum(r["items"] for r in recs)
    secs = max(r["seconds"] for r in recs)
    r_first = max(r["first_batch_seconds"] for r in recs)
    ray_rate, ray_steady = total / secs, total / (secs - r_first)
    print(
        f"{label}: DataLoader {dl_rate:,.0f} {unit}/s (steady {dl_steady:,.0f}, first batch "
        f"{first:.2f} s); Ray {ray_rate:,.0f} {unit}/s (steady {ray_steady:,.0f}, first batch "
        f"{r_first:.2f} s): {ray_rate / dl_rate:.2f}x overall, {ray_steady / dl_steady:.2f}x "
        "steady",
        flush=True,
    )
    return dict(
        dataloader_per_s=dl_rate,
        dataloader_steady_per_s=dl_steady,
        dataloader_first_batch_s=first,
        ray_per_s=ray_rate,
        ray_steady_per_s=ray_steady,
        ray_first_batch_s=r_first,
        ratio=ray_rate / dl_rate,
        steady_ratio=ray_steady / dl_steady,
        unit=unit,
    )


def lm_timing_loop(config):
    """Ray Train worker: one epoch of LM batches, timed in the worker."""
    import ray.train

    from deqray.data.lm import iter_lm_batches

    shard = ray.train.get_dataset_shard("train")
    t = time.perf_counter()
    tokens, first = 0, None
    for b in iter_lm_batches(shard, config["tgt_len"]):
        if first is None:
            first = time.perf_counter() - t
        tokens += b.tokens.numel()
    rec = {"items": tokens, "seconds": time.perf_counter() - t, "first_batch_seconds": first}
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["report_dir"], f"rank-{rank}.json"), "w") as fh:
        json.dump(rec, fh)
    ray.train.report(rec)  # (Result.metrics keeps only reports with a checkpoint)


def vision_timing_loop(config):
    """Ray Train worker: `epochs` passes of image batches, counted (no other work), timed."""
    import ray.train

    from deqray.data.vision import vision_batches

    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(config["epochs"]):
        t = time.perf_counter()
        n, first = 0, None
        for b in vision_batches(shard, batch_size=config["batch_size"]):
            if first is None:
                first = time.perf_counter() - t
            n += b["image"].shape[0]
        epochs.append(
            {"items": n, "seconds": time.perf_counter() - t, "first_batch_seconds": first}
        )
    rec = {k: sum(e[k] for e in epochs) for k in ("items", "seconds", "first_batch_seconds")}
    rec["epochs"] = epochs
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["report_dir"], f"rank-{rank}.json"), "w") as fh:
        json.dump(rec, fh)
    ray.train.report({k: rec[k] for k in ("items", "seconds")})


def ray_trainer(loop, config, datasets, dataset_config, name):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = tempfile.mkdtemp(prefix="deqray-bench-")
    try:
        trainer = TorchTrainer(
            loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            datasets=datasets,
            dataset_config=dataset_config,
            run_config=RunConfig(name=name, storage_path=storage),
        )
        t = time.perf_counter()
        result = trainer.fit()
        return result, time.perf_counter() - t
    finally:
        shutil.rmtree(storage, ignore_errors=True)


# ----------------------------------------------------------------------------- vision


def make_images(workdir: str, n: int) -> str:
    from PIL import Image

    src = os.path.join(workdir, "img_raw")
    if os.path.isdir(src):
        return src
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", n // 10)):
        for i in range(count):
            cls = f"n{i % 10:08d}"
            os.makedirs(os.path.join(src, split, cls), exist_ok=True)
            # smooth random images (like photos, they compress): noise upsampled
            small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((320, 240), Image.BILINEAR)
            img.save(os.path.join(src, split, cls, f"img{i:06d}.JPEG"), quality=90)
    return src


class ImageRows(torch.utils.data.Dataset):
    """The DataLoader peer: rows of the same shards, decoded and transformed per item."""

    def __init__(self, root, split, transform):
        m = load_manifest(root)
        self.uris = m.shard_uris(split)
        self.counts = [s.rows for s in m.splits[split].shards]
        self.offsets = np.cumsum([0] + self.counts)
        self.transform = transform
        self._tables: dict[int, object] = {}

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        from PIL import Image

        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if s not in self._tables:  # each worker reads a shard once
            self._tables[s] = pq.read_table(
                self.uris[s].replace("file://", ""), columns=["image", "label"]
            )
        t = self._tables[s]
        row = i - int(self.offsets[s])
        img = Image.open(io.BytesIO(t.column("image")[row].as_py())).convert("RGB")
        return self.transform(img), int(t.column("label")[row].as_py())


def dataloader_vision(root, size, batch, epochs):
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    ds = ImageRows(root, "train", tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2)
    return timed(loader, lambda b: b[0].shape[0], epochs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "deqray-bench-data"))
    ap.add_argument("--lm-tokens", type=int, default=4_000_000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2, help="passes over the images")
    ap.add_argument(
        "--outputs",
        default="encoded,uint8,float32",
        help="vision_datasets outputs to measure (comma-separated)",
    )
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report = dict(
        date=str(date.today()),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, ray {ray.__version__}",
    )
    try:
        from deqray.data import preprocess

        # --- preprocessing throughput
        text = make_text(args.workdir, args.lm_tokens)
        lm_root = os.path.join(args.workdir, "lm")
        t = time.perf_counter()
        preprocess("wikitext-103", text, lm_root, overwrite=True)
        sec = time.perf_counter() - t
        mb = dir_bytes(text) / 2**20
        report["preprocess_text"] = dict(raw_mb=mb, seconds=sec, mb_per_s=mb / sec)
        print(f"preprocess text: {mb:.1f} MB in {sec:.1f} s = {mb / sec:.1f} MB/s", flush=True)

        imgs = make_images(args.workdir, args.images)
        img_root = os.path.join(args.workdir, "img")
        t = time.perf_counter()
        preprocess("imagenet", imgs, img_root, overwrite=True)
        sec = time.perf_counter() - t
        mb = dir_bytes(imgs) / 2**20
        report["preprocess_images"] = dict(
            raw_mb=mb, seconds=sec, mb_per_s=mb / sec, images_per_s=args.images * 1.1 / sec
        )
        print(f"preprocess images: {mb:.1f} MB in {sec:.1f} s = {mb / sec:.1f} MB/s", flush=True)

        # --- language: Ray Data + TorchTrainer vs DataLoader
        from deqray.data.lm import lm_ingest

        batch, tgt_len = 16, 150
        dl = dataloader_lm(lm_root, batch, tgt_len) if not args.skip_lm else None
        if dl is not None:
            datasets, cfg = lm_ingest(lm_root, batch, splits=("train",))
            report_dir = tempfile.mkdtemp(prefix="deqray-lm-")
            _, wall = ray_trainer(
                lm_timing_loop, {"tgt_len": tgt_len, "report_dir": report_dir}, datasets, cfg, "lm"
            )
            recs = [json.load(open(os.path.join(report_dir, f))) for f in os.listdir(report_dir)]
            report["lm"] = dict(summarize("lm", "tokens", dl, recs), fit_wall_s=wall)

        # --- vision
        from deqray.data.vision import vision_data_config, vision_datasets

        size = 224
        report["vision_configs"] = {}
        for output in args.outputs.split(","):
            # the peer measured again beside each configuration: the load of a
            # shared machine changes over minutes
            dl = dataloader_vision(img_root, size, 32, args.epochs)
            ds = vision_datasets(
                img_root, splits=["train"], size=size, output=output, actors=2, actor_cpus=0.5
            )
            report_dir = tempfile.mkdtemp(prefix="deqray-vision-")
            _, wall = ray_trainer(
                vision_timing_loop,
                {"batch_size": 32, "epochs": args.epochs, "report_dir": report_dir},
                ds,
                vision_data_config("train"),
                "vision",
            )
            recs = [json.load(open(os.path.join(report_dir, f))) for f in os.listdir(report_dir)]
            key = output if output == "encoded" else f"{output}, 2 decode actors x 0.5 CPU"
            report["vision_configs"][key] = dict(
                summarize(f"vision ({key})", "images", dl, recs),
                fit_wall_s=wall,
                first_batch_s_per_epoch=[
                    max(r["epochs"][e]["first_batch_seconds"] for r in recs)
                    for e in range(args.epochs)
                ],
            )
        if "encoded" in report["vision_configs"]:  # the image task's reader
            report["vision"] = dict(
                report["vision_configs"]["encoded"], size=size, epochs=args.epochs
            )
    finally:
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
