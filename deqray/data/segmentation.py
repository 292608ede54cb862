"""Readers for segmentation shards: Ray Datasets of normalised images and their masks.

    from deqray.data.segmentation import segmentation_datasets, segmentation_data_config
    datasets = segmentation_datasets("s3://bucket/cityscapes-parquet")     # {"train", "val"}
    trainer = TorchTrainer(loop, datasets=datasets,
                           dataset_config=segmentation_data_config(["train"]), ...)
    # in the loop:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8):
        images, masks = batch["image"], batch["mask"]   # (B, 3, H, W) float32, (B, H, W) uint8

A batch: "image" float32 (B, 3, H, W), normalised by the manifest's mean and
std (those of the training split): (pixel / 255 - mean) / std per channel;
with `output="uint8"` the decode tasks ship the (B, 3, H, W) uint8 pixels instead
(a quarter of the bytes through the object store) and `segmentation_batches`
normalises them on the worker's device, to the same float32 bit for bit;
"mask" uint8 (B, H, W), class indices 0..C-1 and 255 (the ignore label)
where a pixel has no class, padding included (`.long()` it for a loss);
"index" int64 (B,) only with `with_index`.

The work is spread as in `deqray.data.vision` (read its docstring for the
resources, and why they keep 2 CPUs from deadlocking): one read task a shard
asking `read_cpus` (0), decoding and augmentation in `map_batches` by Ray
tasks of `actor_cpus` each, at most `actors` at once per dataset. Tasks, not
an actor pool: a row's augmentation is seeded by the row (below), so the
decoder keeps nothing between batches, and tasks run in Ray's pooled worker
processes, which stay from one epoch to the next with torch imported, where
Ray Data starts a new actor pool with every execution of a Dataset (each
epoch), each actor importing torch and torchvision (3-4 s on 2 cores).

Augmentation of the training split (torchvision.transforms.v2, the image as
`tv_tensors.Image`, the mask as `tv_tensors.Mask`, so each transform moves
both alike), as the reference's seg_mdeq configs (MDEQ-Vision, from HRNet):
  scale   the long side resized to base_size x s, s drawn from `scales`
          (reference: 0.5, 0.6, ..., 2.1 of 2048); bilinear with antialias
          for the image, nearest neighbour for the mask (v2 does that for a Mask);
  crop    a random `crop_size` window (reference 512 x 1024); where the
          scaled image is smaller it is padded, image with 0 (black, before
          normalisation, as the reference), mask with 255, so padding is
          never scored. Unlike the reference, which pads on the bottom and
          right only, v2 pads both sides and places the image at random in
          the window: every pixel is still kept;
  flip    horizontal with probability `flip`.
Defaults come from the manifest's "augment" (each data set's preprocessor
writes its own; Cityscapes: the reference's), then the arguments.
Evaluation splits, and the training split with `augment=False` or
`deterministic`: no augmentation, the images at `eval_size` (default the
manifest's "image_size", e.g. Cityscapes' full 1024 x 2048, the reference's
test resolution; a smaller eval_size resizes image and mask alike, so the
score is then taken at that resolution).

Randomness: a row's draws come from its own generator, seeded by (`seed`,
the pass over the data, the row's index), so which task decodes a row does
not matter: the same seed gives the same crops, pass by pass. With
`seed=None` the base seed is drawn once from the OS per call.
`deterministic` turns augmentation and shuffling off and keeps the read
order (give the trainer `segmentation_data_config(..., deterministic=True)`
too, which keeps it in each worker's split).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import DataContext, ReadTask, read_datasource
from ray.data.block import BlockMetadata

from ._fs import DataError, locate
from ._ray import read_concurrency
from .images import decode_rgb
from .manifest import Manifest, load_manifest
from .masks import IGNORE, KIND, SCHEMA, decode_mask
from .vision import BLOCK_BYTES, Normalize, ShardSource, _pair, _read_shard, map_decoder

PASS = "_pass"  # column the reader adds: which pass over the data a row belongs to
CONTEXT_KEY = "deqray.segmentation.normalize"  # a Dataset's mean and std, in its DataContext


def _size(value) -> tuple[int, int] | None:
    return None if value is None else _pair(value)


class SegmentationTransform:
    """Encoded image + mask -> normalised float32 (or, `output="uint8"`, raw uint8) images
    and uint8 masks; a map_batches class.

    Training: `stages()` are the scale, crop and flip transforms in order
    (each applied to the image and the mask together); evaluation: a resize
    to `eval_size` when given.
    """

    def __init__(
        self,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_size: int | Sequence[int] | None = None,
        base_size: int | None = None,
        scales: Sequence[float] = (),
        flip: float = 0.0,
        eval_size: int | Sequence[int] | None = None,
        seed: int = 0,
        with_index: bool = False,
        output: str = "float32",
    ):
        if output not in ("float32", "uint8"):
            raise ValueError(f"output must be 'float32' or 'uint8', got {output!r}")
        if train and crop_size is None:
            raise ValueError("training needs a crop_size (the batch's image size)")
        if scales and not base_size:
            raise ValueError("scales need a base_size (the long side at scale 1)")
        if not 0 <= flip <= 1:
            raise ValueError(f"flip is a probability, got {flip}")
        self.train = train
        self.crop_size = _size(crop_size)
        self.base_size = base_size
        self.scales = [float(s) for s in scales]
        self.flip = float(flip)
        self.eval_size = _size(eval_size)
        self.seed = int(seed)
        self.with_index = with_index
        self.output = output
        self.normalize = Normalize(mean, std, channels_last=False)
        self._transform = None

    def stages(self) -> list:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        if not self.train:
            return [v2.Resize(self.eval_size, antialias=True)] if self.eval_size else []
        out = []
        if self.scales:
            # Resize(None, max_size=L) sets the long side to L, keeping the aspect ratio
            out.append(
                v2.RandomChoice(
                    [
                        v2.Resize(None, max_size=max(1, int(self.base_size * s + 0.5)))
                        for s in self.scales
                    ]
                )
            )
        out.append(
            v2.RandomCrop(
                self.crop_size,
                pad_if_needed=True,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE},
            )
        )
        if self.flip:
            out.append(v2.RandomHorizontalFlip(self.flip))
        return out

    def row_seed(self, epoch: int, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])

    def apply(self, image: np.ndarray, mask: np.ndarray, rng_seed: int):
        """(H, W, 3) uint8 RGB and (H, W) uint8 mask -> transformed torch uint8 tensors."""
        import torch
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        if self._transform is None:
            stages = self.stages()
            self._transform = v2.Compose(stages) if stages else v2.Identity()
        if image.shape[:2] != mask.shape:
            raise DataError(f"image is {image.shape[:2]}, its mask {mask.shape}")
        img = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        msk = tv_tensors.Mask(torch.from_numpy(np.array(mask)))
        # v2's random transforms draw from torch's global generator: lend it the
        # row's seed, and give the caller's state back afterwards
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng_seed)
            img, msk = self._transform(img, msk)
        return img, msk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, masks = [], []
        for data, mdata, index, epoch in zip(
            batch["image"], batch["mask"], batch["index"], batch[PASS], strict=True
        ):
            rgb, _ = decode_rgb(data)
            img, msk = self.apply(rgb, decode_mask(mdata), self.row_seed(int(epoch), int(index)))
            if images and img.shape != images[0].shape:
                raise DataError(
                    f"image {int(index)} comes out {tuple(img.shape[1:])}, the batch's first "
                    f"{tuple(images[0].shape[1:])}: images of several sizes need an eval_size"
                )
            images.append(img.numpy())
            masks.append(msk.numpy())
        x = np.stack(images)
        if self.output == "float32":
            import torch

            x = self.normalize(torch.from_numpy(x)).numpy()
        out = {"image": x, "mask": np.stack(masks).astype(np.uint8)}
        if self.with_index:
            out["index"] = np.asarray(batch["index"], dtype=np.int64)
        return out


def _read_with_pass(uri: str, columns: list[str], rows_per_block: int, epoch: int):
    for table in _read_shard(uri, columns, rows_per_block):
        yield table.append_column(PASS, pa.array(np.full(table.num_rows, epoch, np.int64)))


class SegmentationSource(ShardSource):
    """vision's ShardSource over segmentation shards, each row tagged with its pass number.

    The pass (how many times Ray Data has planned this source: the epoch of
    a training split) seeds the augmentation, so every epoch draws anew and
    a rerun with the same seed draws the same.
    """

    def get_name(self) -> str:
        return "SegmentationShards"

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        epoch = self._plans  # the parent's get_read_tasks counts shuffled plans only
        order = list(range(len(self.shards)))
        if self.shuffle:
            seed = None if self.seed is None else self.seed + epoch
            np.random.default_rng(seed).shuffle(order)
        self._plans += 1
        schema = pa.schema([SCHEMA.field(c) for c in self.columns] + [(PASS, pa.int64())])
        tasks = []
        for i in order:
            path, rows, size = self.shards[i]
            uri = f"{self.root}/{path}"
            per_block = max(1, int(BLOCK_BYTES * rows / max(size, 1)))
            tasks.append(
                ReadTask(
                    functools.partial(_read_with_pass, uri, self.columns, per_block, epoch),
                    BlockMetadata(
                        num_rows=rows, size_bytes=size, exec_stats=None, input_files=(uri,)
                    ),
                    schema=schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def transform_options(
    manifest: Manifest, train: bool, *, seed: int, with_index: bool, **overrides: Any
) -> dict[str, Any]:
    """SegmentationTransform's arguments: the manifest's defaults, then the overrides."""
    aug = dict(manifest.meta.get("augment") or {})
    opts: dict[str, Any] = {
        "mean": manifest.meta.get("mean", [0.5, 0.5, 0.5]),
        "std": manifest.meta.get("std", [0.25, 0.25, 0.25]),
        "eval_size": manifest.meta.get("image_size"),
        "crop_size": aug.get("crop_size") or manifest.meta.get("image_size"),
        "base_size": aug.get("base_size"),
        "scales": aug.get("scales", ()),
        "flip": aug.get("flip", 0.0),
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if train:
        opts.pop("eval_size")
    else:
        for key in ("crop_size", "base_size", "scales", "flip"):
            opts.pop(key)
    return {"train": train, "seed": seed, "with_index": with_index, **opts}


def segmentation_datasets(
    root: str,
    *,
    splits: Sequence[str] | None = None,
    train_split: str | None = None,
    output: str = "float32",
    augment: bool = True,
    deterministic: bool = False,
    crop_size: int | Sequence[int] | None = None,
    base_size: int | None = None,
    scales: Sequence[float] | None = None,
    flip: float | None = None,
    eval_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 8,
    actors: int = 2,
    actor_cpus: float = 0.25,
    read_cpus: float = 0.0,
    shuffle: bool = True,
    seed: int | None = None,
    with_index: bool = False,
    verify: str = "size",
    decode_once: Sequence[str] = (),
) -> dict[str, Any]:
    """Ray Datasets {split: Dataset} of a segmentation directory, for TorchTrainer(datasets=).

    The training split (`train_split`, by default the manifest's) is augmented
    unless `augment` is False or `deterministic`, and with `shuffle` read in a
    new shard order each pass (shards were shuffled at preprocessing). Every
    other split gets the evaluation transform. `batch_size` is the decode
    batch of one decode task, not the training batch. `output`: "float32"
    (normalised by the decode tasks) or "uint8" (read it with `segmentation_batches`,
    which normalises on the worker). The splits named in `decode_once` are
    those the caller will `.materialize()`: they must not be augmented (their
    crops would be frozen). See the module docstring for the rows, the
    augmentation, the seeds and the decode tasks (`actors`, `actor_cpus`).
    """
    if output not in ("float32", "uint8"):
        raise ValueError(f"output must be 'float32' or 'uint8', got {output!r}")
    manifest = load_manifest(root, verify=verify)
    if manifest.kind != KIND:
        raise DataError(f"{manifest.root}: a {manifest.kind!r} data set, not segmentation")
    train_split = train_split or manifest.meta.get("train_split") or "train"
    splits = list(splits) if splits else list(manifest.splits)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    root_loc = locate(manifest.root)
    columns = ["image", "mask", "index"]
    context = DataContext.get_current()
    saved = context.execution_options
    if deterministic:  # a Dataset keeps the context it was made in
        context.execution_options = copy.deepcopy(saved)
        context.execution_options.preserve_order = True
    try:
        out = {}
        for name in splits:
            if name not in manifest.splits:
                manifest.shard_uris(name)  # raises, naming the splits there are
            shards = manifest.splits[name].shards
            if not shards:
                raise DataError(f"{manifest.root}: split {name!r} has no images")
            train = name == train_split and augment and not deterministic
            source = SegmentationSource(
                root_loc.uri,
                shards,
                columns,
                shuffle=name == train_split and shuffle and not deterministic,
                seed=seed,
            )
            opts = transform_options(
                manifest,
                train,
                seed=seed,
                with_index=with_index,
                crop_size=crop_size,
                base_size=base_size,
                scales=scales,
                flip=flip,
                eval_size=eval_size,
                mean=mean,
                std=std,
            )
            if not train and opts["eval_size"] is None:
                raise DataError(
                    f"{manifest.root}: images of several sizes (no image_size in the "
                    f"manifest): pass eval_size for split {name!r}"
                )
            try:  # here, not first inside a decode task
                SegmentationTransform(**opts)
            except ValueError as e:
                raise DataError(f"{manifest.root}: split {name!r}: {e}") from None
            ds = read_datasource(source, num_cpus=read_cpus, concurrency=read_concurrency())
            # each read has its own copy of the context (derived Datasets share it)
            ds.context.set_config(CONTEXT_KEY, {"mean": opts["mean"], "std": opts["std"]})
            if name in decode_once and train:
                raise ValueError(f"split {name!r} is augmented: it cannot be decoded once")
            out[name] = map_decoder(
                ds,
                SegmentationTransform,
                {**opts, "output": output},
                True,  # tasks: the module docstring
                batch_size,
                actors,
                actor_cpus,
            )
    finally:
        context.execution_options = saved
    return out


def segmentation_batches(
    data,
    *,
    batch_size: int,
    device=None,
    drop_last: bool = False,
    prefetch_batches: int = 2,
):
    """Batches of a segmentation_datasets Dataset, or of a worker's shard of one, on `device`:
    {"image": (B, 3, H, W) float32 normalised, "mask": (B, H, W) uint8, ["index"]}.

    uint8 images (`output="uint8"`) travel to `device` as they are and are
    normalised there, by the dataset's mean and std; float32 ones pass as
    they are. `device`: by default the Ray Train worker's (CPU outside Train).
    """
    import torch
    from ray.data import Dataset

    context = data.context if isinstance(data, Dataset) else data.get_context()
    stats = context.get_config(CONTEXT_KEY)
    if stats is None:
        raise ValueError(
            f"{type(data).__name__} does not come from segmentation_datasets (no "
            f"{CONTEXT_KEY!r} in its DataContext): its images' mean and std are unknown"
        )
    normalize = Normalize(stats["mean"], stats["std"], channels_last=False)
    for batch in data.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        device="auto" if device is None else device,
        prefetch_batches=prefetch_batches,
    ):
        if batch["image"].dtype == torch.uint8:
            batch["image"] = normalize(batch["image"])
        yield batch


def segmentation_data_config(split: Sequence[str] = ("train",), *, deterministic: bool = False):
    """Ray Train DataConfig: the named splits are divided among the workers (others read
    whole by each); `deterministic` keeps the read order in every worker's part."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    options = None
    if deterministic:
        options = ExecutionOptions()
        options.preserve_order = True
    return DataConfig(datasets_to_split=list(split), execution_options=options)


__all__ = [
    "SegmentationSource",
    "SegmentationTransform",
    "segmentation_batches",
    "segmentation_data_config",
    "segmentation_datasets",
    "transform_options",
]
