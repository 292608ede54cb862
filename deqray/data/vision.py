"""Readers for training on image shards: Ray Datasets of ready, normalised float tensors.

    from deqray.data.vision import vision_datasets, vision_data_config
    datasets = vision_datasets("s3://bucket/imagenet-parquet")        # {"train": ..., "val": ...}
    trainer = TorchTrainer(loop, datasets=datasets, dataset_config=vision_data_config(),
                           scaling_config=ScalingConfig(num_workers=8, use_gpu=True))
    # in the loop:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=64):
        images, labels = batch["image"], batch["label"]    # (B, 3, H, W) float32, (B,) int64

Where the work happens. Shards are read by Ray Data read tasks; decoding and
augmentation run in `map_batches` on a pool of CPU actors
(`ActorPoolStrategy`): an actor imports torchvision and sets up its
transforms once, then serves many batches. Training workers only receive
finished float tensors, so a GPU never waits on JPEG decoding, and the CPU
work spreads over every node's CPUs, not just the GPU nodes'. The image
column (binary) never reaches `iter_torch_batches`, which could not turn it
into a tensor.

Augmentation (torchvision.transforms.v2 on uint8 tensors):
  training    random-resized crop to `size` (area `scale`, aspect `ratio`),
              horizontal flip with probability `flip`;
  evaluation  resize the shorter side to size / crop_fraction, center crop
              to `size`: deterministic;
  both        scale to [0, 1] and normalise with the manifest's per-channel
              mean and std (those of the training split, from preprocessing).
Defaults follow the data set: ImageNet (images of any size) 224 px with the
usual 0.875 crop fraction; sets of one fixed size (CIFAR-10 32 px, digits
8 px) their own size with crop fraction 1, so evaluation sees whole images.

Resources: why reading cannot starve on 2 CPUs. Every evaluation split is
read whole by every worker, so each worker runs its own Ray Data execution
of it, with its own decode actor; a decode actor holds its CPU share while
it waits for input. If the workers plus those idle actors fill the CPUs, the
read tasks that would feed the actors never start (Ray Data reports
`backpressured:tasks(ResourceBudget)`): a deadlock. Hence:
  - read tasks ask for `read_cpus` = 0: reading a parquet shard is I/O and
    a memcpy, and a read that needs no CPU share can always start;
  - decode actors ask for `actor_cpus` = 0.25, at most `actors` = 2 per
    dataset (each execution starts with 1);
  - train workers must ask for fractions too. With
    `ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})` the
    worst case (both workers evaluating in the middle of a training epoch)
    holds 2 x 0.5 + 2 x 0.25 (training pool) + 2 x 0.25 (evaluation) = 2 CPUs.
    Whole-CPU workers (Ray's default) leave nothing and hang.
The shares are bookkeeping, not limits: an actor decodes on a whole core
when it gets one. On a GPU cluster give decode actors `actor_cpus=1` and
`actors` up to the CPUs there are to spare per dataset.

Evaluation splits are read whole by every worker when the trainer gets
`vision_data_config()` (only the training split is split across workers).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import ActorPoolStrategy, Datasource, ReadTask, read_datasource
from ray.data.block import BlockMetadata

from ._fs import DataError, locate
from .images import SCHEMA, decode_rgb
from .manifest import Manifest, load_manifest

DEFAULT_SIZE = 224  # for data sets of varying image size (ImageNet)
DEFAULT_CROP_FRACTION = 0.875  # the usual 256 -> 224 evaluation crop


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class DecodeTransform:
    """Encoded images -> normalised float32 (B, 3, H, W); a Ray Data `map_batches` callable class.

    Keeps the other columns it is given (the label, the index) as they are.
    """

    def __init__(
        self,
        *,
        size: int | Sequence[int],
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
        crop_fraction: float = DEFAULT_CROP_FRACTION,
    ):
        import torch
        from torchvision.transforms import v2

        # The random stream is the transform's own, drawn from the OS: torch
        # starts every process from the same fixed seed, so relying on the
        # global generator would give every decode actor the same crops and
        # flips (and using it would disturb the caller's). No thread setting
        # either: Ray gives an actor OMP_NUM_THREADS = its CPU share (>= 1).
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        self._rng_state = generator.get_state()
        self.size = _pair(size)
        self.train = train
        if train:
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(
                        self.size, scale=tuple(scale), ratio=tuple(ratio), antialias=True
                    ),
                    v2.RandomHorizontalFlip(flip),
                ]
            )
        else:
            if not 0 < crop_fraction <= 1:
                raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
            # the shorter side is resized so that the crop keeps crop_fraction of it
            resize = math.ceil(max(self.size) / crop_fraction - 1e-9)
            self.transform = v2.Compose(
                [v2.Resize(resize, antialias=True), v2.CenterCrop(self.size)]
            )
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self.inv_std = 1 / (np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * 255)

    @staticmethod
    def decode(data: bytes):
        """(3, H, W) uint8 tensor of an encoded image; any colour mode becomes RGB.

        PIL rather than torchvision.io: torchvision 0.29 deprecates its
        decoders (for TorchCodec, not a dependency here), and for JPEG both
        end in libjpeg-turbo (PIL is ~20% slower on a 500x375 photo).
        """
        import torch

        rgb, _ = decode_rgb(data)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # a writable copy

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        h, w = self.size
        images = np.empty((len(batch["image"]), 3, h, w), dtype=np.float32)
        # torchvision's random transforms draw from torch's global generator:
        # lend it our state for the batch, then take the advanced state back
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            for i, data in enumerate(batch["image"]):
                images[i] = self.transform(self.decode(data)).numpy()
            self._rng_state = torch.get_rng_state()
        images -= self.mean
        images *= self.inv_std
        out = {k: v for k, v in batch.items() if k != "image"}
        out["image"] = images
        return out


def transform_options(manifest: Manifest, train: bool, **overrides: Any) -> dict[str, Any]:
    """DecodeTransform's arguments for a data set: defaults from its manifest, then overrides."""
    fixed = manifest.meta.get("image_size")
    opts: dict[str, Any] = {
        "size": _pair(fixed) if fixed else DEFAULT_SIZE,
        "crop_fraction": 1.0 if fixed else DEFAULT_CROP_FRACTION,
        "mean": manifest.meta.get("mean", [0.5, 0.5, 0.5]),
        "std": manifest.meta.get("std", [0.25, 0.25, 0.25]),
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if not train:
        for key in ("scale", "ratio", "flip"):
            opts.pop(key, None)
    return {"train": train, **opts}


BLOCK_BYTES = 32 << 20  # encoded bytes per block handed to the decode actors


def _read_shard(uri: str, columns: list[str], rows_per_block: int):
    """Read task body: one parquet shard, yielded as blocks of `rows_per_block` rows."""
    loc = locate(uri)
    try:
        with loc.fs.open_input_file(loc.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(
                batch_size=rows_per_block, columns=columns
            ):
                yield pa.Table.from_batches([batch])
    except (OSError, pa.ArrowInvalid) as e:
        # e.g. a shard truncated after the manifest was checked
        raise DataError(f"{loc}: cannot read shard ({e})") from None


class ShardSource(Datasource):
    """A Ray Data datasource over the shards a manifest lists: one read task per shard.

    Why not `read_parquet`: the manifest already lists every shard with its
    rows and bytes, so nothing needs listing; and Ray 2.60's parquet reader
    starts with a file-listing task that asks for a whole CPU, which on a
    2-CPU machine whose CPUs the train workers and decode actors hold waits
    forever. These read tasks take `read_cpus` like any other.

    With `shuffle`, the shard order is drawn afresh each time Ray Data plans
    an execution (each epoch), which `randomize_block_order` would do only
    behind a barrier that holds the whole epoch in the object store. A
    `seed` makes the sequence of orders reproducible.
    """

    def __init__(self, root: str, shards, columns, *, shuffle: bool, seed: int | None):
        super().__init__()
        self.root = root.rstrip("/")
        self.shards = [(s.path, s.rows, s.bytes) for s in shards]
        self.columns = list(columns)
        self.shuffle = shuffle
        self.seed = seed
        self._plans = 0

    def get_name(self) -> str:
        return "ImageShards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(b for _, _, b in self.shards)

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        order = list(range(len(self.shards)))
        if self.shuffle:
            seed = None if self.seed is None else self.seed + self._plans
            np.random.default_rng(seed).shuffle(order)
            self._plans += 1
        schema = pa.schema([SCHEMA.field(c) for c in self.columns])
        tasks = []
        for i in order:
            path, rows, size = self.shards[i]
            uri = f"{self.root}/{path}"
            per_block = max(1, int(BLOCK_BYTES * rows / max(size, 1)))
            tasks.append(
                ReadTask(
                    functools.partial(_read_shard, uri, self.columns, per_block),
                    BlockMetadata(
                        num_rows=rows, size_bytes=size, exec_stats=None, input_files=(uri,)
                    ),
                    schema=schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def vision_datasets(
    root: str,
    *,
    splits: Sequence[str] | None = None,
    train_split: str | None = None,
    size: int | Sequence[int] | None = None,
    crop_fraction: float | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 32,
    actors: int = 2,
    actor_cpus: float = 0.25,
    read_cpus: float = 0.0,
    shuffle: bool = True,
    seed: int | None = None,
    with_index: bool = False,
    verify: str = "size",
) -> dict[str, Any]:
    """Ray Datasets {split: Dataset} of a preprocessed image directory, for TorchTrainer(datasets=).

    Rows: "image" float32 (3, H, W) normalised, "label" int64, and "index"
    int64 (the image's id in its split) when `with_index`. The training split
    (`train_split`, by default the manifest's) is augmented and, with
    `shuffle`, read in a random block order each epoch (shards were shuffled
    at preprocessing; add `local_shuffle_buffer_size` in `iter_torch_batches`
    for more); the other splits get the deterministic evaluation transform.
    `batch_size` is the decode batch of one actor call, not the training
    batch. `verify` is load_manifest's check of the shards ("checksum" reads
    them all once).
    """
    manifest = load_manifest(root, verify=verify)
    if manifest.kind != "vision":
        raise DataError(f"{manifest.root}: a {manifest.kind!r} data set, not images")
    train_split = train_split or manifest.meta.get("train_split") or "train"
    splits = list(splits) if splits else list(manifest.splits)
    root_loc = locate(manifest.root)
    columns = ["image", "label"] + (["index"] if with_index else [])
    out = {}
    for name in splits:
        shards = manifest.splits[name].shards if name in manifest.splits else None
        if not shards:
            if name not in manifest.splits:
                manifest.shard_uris(name)  # raises, naming the splits there are
            raise DataError(f"{manifest.root}: split {name!r} has no images")
        train = name == train_split
        ds = read_datasource(
            ShardSource(root_loc.uri, shards, columns, shuffle=train and shuffle, seed=seed),
            num_cpus=read_cpus,
        )
        opts = transform_options(
            manifest,
            train,
            size=size,
            crop_fraction=crop_fraction,
            scale=scale,
            ratio=ratio,
            flip=flip,
            mean=mean,
            std=std,
        )
        out[name] = ds.map_batches(
            DecodeTransform,
            fn_constructor_kwargs=opts,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
            num_cpus=actor_cpus,
        )
    return out


def vision_data_config(train_split: str = "train"):
    """Ray Train DataConfig: only the training split is divided among workers."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[train_split])


def consume_loop(config: dict) -> None:
    """A Ray Train worker loop that reads its dataset shards and records what it received.

    For tests and benchmarks of the readers: no model. config: "splits"
    (names to read), "batch_size", "epochs" (default 1), "report_dir" (where
    each rank writes rank-<r>.json: per epoch and split, rows, seconds,
    seconds to the first batch, tensor shape/dtype/range and, when the data
    carries it, the image ids), "sync" (default True: all ranks start each
    split together, as a DDP loop whose steps all-reduce would; it is also
    the moment when every worker's evaluation read starts at once).
    """
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    record: dict[str, Any] = {"rank": rank, "epochs": []}
    total = 0
    for _ in range(int(config.get("epochs", 1))):
        epoch = {}
        for name in config["splits"]:
            if config.get("sync", True) and dist.is_available() and dist.is_initialized():
                dist.barrier()
            shard = ray.train.get_dataset_shard(name)
            start = time.perf_counter()
            rows, ids, shapes, dtypes = 0, [], set(), set()
            lo, hi = math.inf, -math.inf
            first = None
            for batch in shard.iter_torch_batches(batch_size=int(config.get("batch_size", 32))):
                if first is None:  # start-up (decode actors import torch): seconds, not rate
                    first = time.perf_counter() - start
                x = batch["image"]
                rows += x.shape[0]
                shapes.add(tuple(x.shape[1:]))
                dtypes.add(str(x.dtype))
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
                if "index" in batch:
                    ids.extend(batch["index"].tolist())
            epoch[name] = {
                "rows": rows,
                "seconds": time.perf_counter() - start,
                "first_batch_seconds": first,
                "shapes": sorted(shapes),
                "dtypes": sorted(dtypes),
                "min": lo,
                "max": hi,
                "index": ids,
            }
            total += rows
        record["epochs"].append(epoch)
    if config.get("report_dir"):
        locate(config["report_dir"]).join(f"rank-{rank}.json").write_bytes(
            json.dumps(record).encode()
        )
    ray.train.report({"rows": total})


__all__ = [
    "DecodeTransform",
    "consume_loop",
    "transform_options",
    "vision_data_config",
    "vision_datasets",
]
