"""Readers for training on image shards: Ray Datasets of images, and the batches a worker gets.

    from deqray.data.vision import vision_batches, vision_data_config, vision_datasets
    datasets = vision_datasets("s3://bucket/imagenet-parquet", output="encoded")
    trainer = TorchTrainer(loop, datasets=datasets, dataset_config=vision_data_config(),
                           scaling_config=ScalingConfig(num_workers=8, use_gpu=True))
    # in the loop:
    for batch in vision_batches(ray.train.get_dataset_shard("train"), batch_size=64):
        images, labels = batch["image"], batch["label"]    # (B, 3, H, W) float32, (B,) int64

Where the work happens: `output`, what a Dataset's "image" column holds.
  "encoded"  the shards' bytes as they are. `vision_batches` decodes and
             augments them on the worker, in the threads where Ray Data
             collates its prefetched batches (`prefetch_batches` of them, at
             most 4 by Ray's default; Pillow and torch release the GIL), then
             normalises them there on a CPU worker, or moves them to the GPU as
             uint8 and normalises there. Nothing starts with an epoch but
             the read tasks, whose processes Ray keeps between epochs: this is
             the fast path (benchmarks/bench_data.py), what the image task uses
             for every split that is not decoded once.
  "uint8"    decoded and augmented by Ray Data actors (`ActorPoolStrategy`),
             (H, W, 3) uint8 through the object store (a quarter of float32);
             `vision_batches` normalises on the worker's device. The CPU work
             runs wherever the cluster has CPUs, not only on the GPU nodes. But
             Ray 2.60 starts an actor pool with every execution (each epoch:
             Train's SplitCoordinator builds a new executor per epoch), and each
             actor imports torch: seconds before an epoch's first batch.
  "float32"  as "uint8", normalised by the actors: rows ready for
             `iter_torch_batches` with no further work (the reference path).
`vision_batches` gives the same float32 batches from all three: one
normalisation (`Normalize`) serves the actors and the workers, and its two
float32 operations are exactly rounded on any device. A Dataset carries its
transform's options in its DataContext (key `CONTEXT_KEY`), so
`vision_batches` needs no options: it reads them from the shard.

Augmentation (Pillow geometry on the decoded image, our own random stream):
  training    random-resized crop to `size` (area `scale` of the image,
              aspect `ratio`, torchvision's sampling rule: ten draws, then the
              whole image cut to the nearest allowed aspect), horizontal flip
              with probability `flip`; the crop and the resize are one Pillow
              resize of the crop box (bilinear, antialiased);
  evaluation  resize the shorter side to size / crop_fraction, center crop
              to `size` (torchvision's Resize + CenterCrop, as one resize of
              the box the crop covers): deterministic;
  both        (x / 255 - mean) / std with the manifest's per-channel mean and
              std (those of the training split, from preprocessing).
Defaults follow the data set: ImageNet (images of any size) 224 px with the
usual 0.875 crop fraction; sets of one fixed size (CIFAR-10 32 px, digits
8 px) their own size with crop fraction 1, so evaluation sees whole images.

Resources (the actor outputs): why reading cannot starve on 2 CPUs. Every
evaluation split is read whole by every worker, so each worker runs its own
Ray Data execution of it, with its own decode actor; a decode actor holds its
CPU share while it waits for input. If the workers plus those idle actors
fill the CPUs, the read tasks that would feed the actors never start (Ray
Data reports `backpressured:tasks(ResourceBudget)`): a deadlock. Hence:
  - read tasks ask for `read_cpus` = 0: reading a parquet shard is I/O and
    a memcpy, and a read that needs no CPU share can always start. At most
    `read_concurrency()` (the cluster's CPUs) run at once: nothing else
    bounds reads that ask for no CPU, and Ray starts a worker process for
    each read in flight (22 for an epoch of 27 shards on 2 CPUs, the first
    batch after 27 s instead of 7.5 s: benchmarks/bench_segmentation_data.py);
  - decode actors ask for `actor_cpus` = 0.25, at most `actors` = 2 per
    dataset (each execution starts with 1);
  - train workers must ask for fractions too. With
    `ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}`) the
    worst case (both workers evaluating in the middle of a training epoch)
    holds 2 x 0.5 + 2 x 0.25 (training pool) + 2 x 0.25 (evaluation) = 2 CPUs.
    Whole-CPU workers (Ray's default) leave nothing and hang.
The shares are bookkeeping, not limits: an actor decodes on a whole core
when it gets one. On a GPU cluster give decode actors `actor_cpus=1` and
`actors` up to the CPUs there are to spare per dataset. "encoded" has no
actors: its decoding is the worker's own CPU time.

Evaluation splits are read whole by every worker when the trainer gets
`vision_data_config()` (only the training split is split across workers).
"""

from __future__ import annotations

import functools
import io
import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import (
    ActorPoolStrategy,
    Dataset,
    Datasource,
    ReadTask,
    TaskPoolStrategy,
    read_datasource,
)
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn

from ._fs import DataError, StorageUnavailable, locate, retrying_iter
from ._ray import read_concurrency
from .images import SCHEMA
from .manifest import Manifest, load_manifest

DEFAULT_SIZE = 224  # for data sets of varying image size (ImageNet)
DEFAULT_CROP_FRACTION = 0.875  # the usual 256 -> 224 evaluation crop
OUTPUTS = ("encoded", "uint8", "float32")
CONTEXT_KEY = "deqray.vision.transform"  # a Dataset's DecodeTransform options, in its DataContext
DECODE_THREADS = 4  # prefetched batches a worker decodes at once (Ray caps its threads at 4)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Normalize:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 (x / 255 - mean) / std, on x's device.

    `channels_last=False` takes (B, 3, H, W) uint8 instead (the segmentation
    reader's). Computed as (x - 255 mean) * (1 / (255 std)): a conversion and
    two float32 operations, each exactly rounded, so a GPU gives the CPU's
    numbers bit for bit. The constants are kept per device.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, channels_last: bool = True):
        self.shift = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self.scale = 1 / (np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1) * 255)
        self.channels_last = channels_last
        self._constants: dict[Any, tuple] = {}

    def __call__(self, x):
        import torch

        channels = x.shape[-1 if self.channels_last else 1] if x.ndim == 4 else None
        if x.dtype != torch.uint8 or channels != 3:
            layout = "(B, H, W, 3)" if self.channels_last else "(B, 3, H, W)"
            raise ValueError(f"expected {layout} uint8 images, got {tuple(x.shape)} {x.dtype}")
        if x.device not in self._constants:
            self._constants[x.device] = tuple(
                torch.from_numpy(c).to(x.device) for c in (self.shift, self.scale)
            )
        shift, scale = self._constants[x.device]
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out.copy_(x)  # the layout change and the conversion in one pass
        return out.sub_(shift).mul_(scale)


class DecodeTransform:
    """Encoded images -> (B, H, W, 3) uint8 or normalised (B, 3, H, W) float32 (`output`).

    A Ray Data `map_batches` callable class (one per decode actor) and the
    decoder of `vision_batches` (one per worker iterator, called from
    several threads at once). Keeps the other columns it is given (the label,
    the index) as they are.
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
        output: str = "float32",
    ):
        if output not in ("uint8", "float32"):
            raise ValueError(f"output must be 'uint8' or 'float32', got {output!r}")
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.size = _pair(size)
        self.train = train
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = float(flip)
        # the shorter side is resized so that the crop keeps crop_fraction of it
        self.resize = math.ceil(max(self.size) / crop_fraction - 1e-9)
        self.output = output
        self.normalize = Normalize(mean, std)
        # Our own stream, seeded from the OS: torch starts every process from
        # the same seed (every actor would crop alike), and torchvision's
        # samplers draw from torch's global generator, which belongs to the
        # training thread (its dropout, its checkpointed RNG state) while we
        # decode beside it. The lock: several collate threads share one decoder.
        self._rng = np.random.default_rng()
        self._lock = threading.Lock()

    def crop_box(self, width: int, height: int) -> tuple[tuple[float, ...], bool]:
        """The region of a width x height image that becomes the output, and whether to flip."""
        if not self.train:
            return self._center_box(width, height), False
        with self._lock:
            left, top, w, h = self._random_crop(width, height)
            flip = self.flip > 0 and self._rng.random() < self.flip
        return (left, top, left + w, top + h), flip

    def _random_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop rule, drawn from our generator
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * self._rng.uniform(*self.scale)
            aspect = math.exp(self._rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(self._rng.integers(0, height - h + 1))
                left = int(self._rng.integers(0, width - w + 1))
                return left, top, w, h
        # no draw fitted: the whole image, cut to the nearest allowed aspect
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def _center_box(self, width: int, height: int) -> tuple[float, ...]:
        # torchvision's Resize(shorter side) then CenterCrop, mapped back onto
        # the source: resampling that box gives the same pixels in one pass
        short, long = min(width, height), max(width, height)
        r_long = int(self.resize * long / short)
        rw, rh = (self.resize, r_long) if width <= height else (r_long, self.resize)
        ch, cw = self.size
        top, left = int(round((rh - ch) / 2)), int(round((rw - cw) / 2))
        sx, sy = width / rw, height / rh
        return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)

    def pixels(self, images: Sequence[bytes]) -> np.ndarray:
        """(B, H, W, 3) uint8 of a batch of encoded images (any colour mode becomes RGB).

        Pillow for decoding (libjpeg-turbo for JPEG; torchvision 0.29 deprecates
        its own decoders) and for the geometry, so the pixels never leave its
        buffers until the final copy.
        """
        from PIL import Image, UnidentifiedImageError

        h, w = self.size
        out = np.empty((len(images), h, w, 3), dtype=np.uint8)
        for i, data in enumerate(images):
            if not isinstance(data, bytes):
                raise DataError(f"expected encoded image bytes, got {type(data).__name__}")
            try:
                img = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                raise DataError("not an image format PIL can read") from None
            if img.mode != "RGB":
                img = img.convert("RGB")
            box, flip = self.crop_box(*img.size)
            img = img.resize((w, h), Image.BILINEAR, box=box)
            a = np.asarray(img)
            out[i] = a[:, ::-1] if flip else a
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        images = self.pixels(batch["image"])
        if self.output == "float32":
            images = self.normalize(torch.from_numpy(images)).numpy()
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


# Encoded bytes per block. Small, because Train's equal split hands a block
# to a worker only once as many rows wait behind it (to even the split out at
# the end): an epoch's first batch waits for two blocks to be read.
BLOCK_BYTES = 4 << 20


def _read_shard(uri: str, columns: list[str], rows_per_block: int):
    """Read task body: one parquet shard, yielded as blocks of `rows_per_block` rows."""
    loc = locate(uri)

    def batches():
        with loc.fs.open_input_file(loc.path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=rows_per_block, columns=columns)

    try:
        for batch in retrying_iter("read", loc.uri, batches):  # outages retried
            yield pa.Table.from_batches([batch])
    except StorageUnavailable:
        raise
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
    output: str = "float32",
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

    Rows: "image" as `output` says (the module docstring: encoded bytes,
    (H, W, 3) uint8, or normalised (3, H, W) float32), "label" int64, and
    "index" int64 (the image's id in its split) when `with_index`. The
    training split (`train_split`, by default the manifest's) is augmented
    and, with `shuffle`, read in a random block order each epoch (shards were
    shuffled at preprocessing); the other splits get the deterministic
    evaluation transform. `batch_size`, `actors` and `actor_cpus` are the
    decode actors' (not the training batch). `verify` is load_manifest's check
    of the shards ("checksum" reads them all once).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
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
            concurrency=read_concurrency(),
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
        try:  # bad options fail here, not first inside a decode actor or a worker
            DecodeTransform(**opts)
        except ValueError as e:
            raise DataError(f"{manifest.root}: split {name!r}: {e}") from None
        # each read has its own copy of the context (derived Datasets share it)
        ds.context.set_config(CONTEXT_KEY, opts)
        if output != "encoded":
            ds = decoded_by_actors(
                ds, output=output, batch_size=batch_size, actors=actors, actor_cpus=actor_cpus
            )
        out[name] = ds
    return out


def _options(data) -> dict[str, Any]:
    context = data.context if isinstance(data, Dataset) else data.get_context()
    opts = context.get_config(CONTEXT_KEY)
    if opts is None:
        raise ValueError(
            f"{type(data).__name__} does not come from vision_datasets (no {CONTEXT_KEY!r} "
            "in its DataContext): nothing says how to decode its images"
        )
    return opts


def decoded_by_actors(
    ds: Dataset,
    *,
    output: str = "uint8",
    batch_size: int = 32,
    actors: int = 2,
    actor_cpus: float = 0.25,
) -> Dataset:
    """An "encoded" Dataset of vision_datasets, decoded by a pool of Ray Data actors.

    For a split streamed to the workers with its decoding on other CPUs (other
    nodes'); a split decoded once and kept is cheaper with `decoded_by_tasks`.
    `vision_batches` reads the result as well.
    """
    return map_decoder(
        ds, DecodeTransform, _decode_options(ds, output), False, batch_size, actors, actor_cpus
    )


def decoded_by_tasks(
    ds: Dataset,
    *,
    output: str = "uint8",
    batch_size: int = 32,
    tasks: int = 2,
    task_cpus: float = 0.25,
) -> Dataset:
    """An "encoded" Dataset of vision_datasets, decoded by at most `tasks` Ray tasks at once:
    for a split decoded once and kept (`.materialize()`, an evaluation split)."""
    return map_decoder(
        ds, DecodeTransform, _decode_options(ds, output), True, batch_size, tasks, task_cpus
    )


def _decode_options(ds: Dataset, output: str) -> dict[str, Any]:
    if output not in ("uint8", "float32"):
        raise ValueError(f"output must be 'uint8' or 'float32', got {output!r}")
    return {**_options(ds), "output": output}


def map_decoder(
    ds: Dataset, make: Any, options: dict, tasks: bool, batch_size: int, size: int, cpus: float
) -> Dataset:
    """`ds` through the decoder class `make(**options)`, `size` at a time of `cpus` each.

    `tasks`: Ray tasks, each making its own decoder for its batch. They run in
    Ray's pooled worker processes, which keep their imports from one task to
    the next and from one epoch to the next, where an actor pool starts
    processes of its own for every execution of a Dataset (3-4 s each, torch
    and torchvision imported, on 2 cores). Fit for any decoder that holds no
    state between batches: an unaugmented one, or one whose random draws are
    seeded by the row (SegmentationTransform). Otherwise a pool of actors,
    each with its decoder, for the decoders that keep a random stream.
    """
    if tasks:
        return ds.map_batches(
            decode_in_task,
            fn_kwargs={"make": make, "options": options},
            batch_size=batch_size,
            batch_format="numpy",
            compute=TaskPoolStrategy(size=max(1, size)),
            num_cpus=cpus,
        )
    return ds.map_batches(
        make,
        fn_constructor_kwargs=options,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, size)),
        num_cpus=cpus,
    )


def decode_in_task(batch: dict, *, make: Any, options: dict) -> dict:
    """One batch through a decoder made for it: map_decoder's function for Ray tasks."""
    return make(**options)(batch)


class _WorkerCollate(NumpyBatchCollateFn):
    """Ray Data's collate step on the worker: numpy rows -> torch tensors.

    Runs in Ray's prefetch threads: encoded images are decoded and augmented
    here; uint8 images are normalised here when the batches stay on the CPU.
    Float32 images (decoded and normalised by actors) pass as they are.
    """

    def __init__(self, options: dict[str, Any], normalize_here: bool):
        self.decoder = DecodeTransform(**{**options, "output": "uint8"})
        self.normalize_here = normalize_here

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        images = batch["image"]
        if images.dtype == object:
            images = self.decoder.pixels(images)
        elif not images.flags.writeable:  # a zero-copy view of the object store
            images = images.copy()
        x = torch.from_numpy(images)
        if self.normalize_here and x.dtype == torch.uint8:
            x = self.decoder.normalize(x)
        out = {k: torch.from_numpy(np.array(v)) for k, v in batch.items() if k != "image"}
        out["image"] = x
        return out


def vision_batches(
    data,
    *,
    batch_size: int,
    device=None,
    drop_last: bool = False,
    prefetch_batches: int = DECODE_THREADS,
) -> Iterator[dict[str, Any]]:
    """Batches of a vision_datasets Dataset, or of a worker's shard of one, on `device`.

    {"image": (B, 3, H, W) float32 normalised, "label": (B,) int64, ["index"]}.
    `device`: by default the Ray Train worker's (CPU outside Train). Order is
    kept when the data's execution options say `preserve_order`.
    """
    import torch
    from ray.train.torch import get_device
    from ray.train.utils import _in_ray_train_worker

    options = _options(data)
    if device is None:
        device = get_device() if _in_ray_train_worker() else "cpu"
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    collate = _WorkerCollate(options, normalize_here=on_cpu)
    batches = data.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        device=device,
        collate_fn=collate,
        prefetch_batches=prefetch_batches,
        pin_memory=not on_cpu,
    )
    for batch in batches:
        if batch["image"].dtype == torch.uint8:  # moved as uint8: normalised where it landed
            batch["image"] = collate.decoder.normalize(batch["image"])
        yield batch


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
    Batches come through `vision_batches`, so any `output` reads alike.
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
            for batch in vision_batches(shard, batch_size=int(config.get("batch_size", 32))):
                if first is None:  # start-up: seconds, not rate
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
    "CONTEXT_KEY",
    "DecodeTransform",
    "Normalize",
    "consume_loop",
    "decoded_by_actors",
    "decoded_by_tasks",
    "transform_options",
    "vision_batches",
    "vision_data_config",
    "vision_datasets",
]
