"""The segmentation shard format, shared by its writers (Cityscapes, the embedded shapes).

One row per image, in parquet shards beside a manifest of kind "segmentation":

    image         binary   the encoded image: Cityscapes' PNG bytes as they were on
                           disk, PNG for generated sets
    mask          binary   PNG, 8-bit single channel, same height and width as the
                           image: the class index of every pixel (0 .. C-1), or
                           IGNORE (255) where a pixel has no class to learn
    index         int64    position of the image in its split's order: a stable id,
                           unique in the split (a skipped image leaves a gap)
    source        string   where it came from ("train/aachen/aachen_..._leftImg8bit.png")
    height, width int32    of the image (and the mask)

Manifest meta: "classes" (index order), "num_classes", "ignore_index" (255),
"channels" (3: readers decode to RGB), "mean"/"std" (training split, RGB in
[0, 1]), "image_size" ([H, W] when every image shares it, else None),
"train_split", "columns", "options" (what the output was made with: a rerun
with others is refused, see `images.reuse_existing`), and "augment": the data set's default training
augmentation for the readers ({"base_size", "crop_size", "scales", "flip"},
see `deqray.data.segmentation`). Per split, stats "class_pixels" (every
class, zeros included), "ignored_pixels", "formats", "skipped" ({file,
error} of images left out) and "raw_bytes".

Masks are stored as class indices, not the source's label ids: the mapping
is done once here, so a reader never needs the source's label table.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ._fs import Location
from .images import PixelStats, ShardReport, assemble_splits, shard_name
from .manifest import Manifest, Split, commit_output, load_manifest, write_manifest, write_shard

KIND = "segmentation"
IGNORE = 255
# The pixel-count key of IGNORE inside a ShardReport's class counts: parentheses
# cannot start a class name that validate_classes accepts.
_IGNORED_KEY = "(ignored)"

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("index", pa.int64()),
        ("source", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)


def validate_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if not 1 <= len(classes) < IGNORE:
        raise ValueError(f"a segmentation set has 1..{IGNORE - 1} classes, got {len(classes)}")
    if len(set(classes)) != len(classes) or any(c.startswith("(") or not c for c in classes):
        raise ValueError(f"class names must be distinct, non-empty, not '(...)': {classes}")
    return classes


def decode_mask(data: bytes) -> np.ndarray:
    """(H, W) uint8 class indices of a PNG mask; ValueError if it is not one channel of 8 bits."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image format PIL can read") from None
    with img:
        img.load()
        if img.mode not in ("L", "P"):
            raise ValueError(f"a mask is one 8-bit channel (PNG mode L), got mode {img.mode}")
        return np.asarray(img)


def count_pixels(report: ShardReport, mask: np.ndarray, classes: Sequence[str]) -> None:
    """Add a mask's pixels per class (and ignored) to a shard report."""
    counts = np.bincount(mask.reshape(-1), minlength=256)
    for i, name in enumerate(classes):
        if counts[i]:
            report.class_counts[name] += int(counts[i])
    if counts[IGNORE]:
        report.class_counts[_IGNORED_KEY] += int(counts[IGNORE])
    stray = np.flatnonzero(counts[len(classes) :])
    stray = stray[stray + len(classes) != IGNORE]
    if stray.size:  # a writer's bug, not bad input: the writer maps every label first
        raise ValueError(f"mask holds class {int(stray[0]) + len(classes)} of {len(classes)}")


def write_seg_shard(out: Location, report: ShardReport, rows: list[dict]) -> None:
    """Write the rows as shard `report.order` of `report.split` (nothing if no row survived)."""
    if rows:
        table = pa.table({n: [r[n] for r in rows] for n in SCHEMA.names}, schema=SCHEMA)
        report.shard = write_shard(out, shard_name(report.split, report.order), table)


def assemble(
    reports: Iterable[ShardReport], splits: Sequence[str], classes: Sequence[str]
) -> tuple[dict[str, Split], PixelStats]:
    """Merge shard reports into the manifest's splits; and the training split's pixel stats."""
    out, stats = assemble_splits(reports, splits, [*classes, _IGNORED_KEY])
    for split in out.values():
        pixels = split.stats.pop("class_counts")
        split.stats["ignored_pixels"] = pixels.pop(_IGNORED_KEY)
        split.stats["class_pixels"] = pixels
    return out, stats


def finish(
    out_loc: Location,
    *,
    staged: Location | None = None,
    dataset: str,
    source: str,
    classes: Sequence[str],
    splits: dict[str, Split],
    stats: PixelStats,
    meta: dict[str, Any],
    options: dict[str, Any],
    progress: bool,
) -> Manifest:
    """Write the manifest (last: its presence means the output is complete) and load it back.

    `options` are those the writer gave `reuse_existing`: what a rerun is compared with.
    """
    mean, std = stats.mean_std()
    manifest = Manifest(
        dataset=dataset,
        kind=KIND,
        splits=splits,
        meta={
            "classes": list(classes),
            "num_classes": len(classes),
            "ignore_index": IGNORE,
            "channels": 3,
            "mean": mean,
            "std": std,
            "columns": SCHEMA.names,
            **meta,
            "options": options,
        },
        source=source,
    )
    if staged is not None:  # --overwrite of a finished output: swap the new files in now
        commit_output(out_loc, staged)
    write_manifest(out_loc, manifest)
    if progress:
        for name, s in splits.items():
            skipped = len(s.stats["skipped"])
            note = f", {skipped} skipped (listed in the manifest)" if skipped else ""
            print(
                f"[{dataset}] {name}: {s.rows:,} images in {len(s.shards)} shards{note}",
                file=sys.stderr,
                flush=True,
            )
    return load_manifest(out_loc, verify="none")


__all__ = [
    "IGNORE",
    "KIND",
    "SCHEMA",
    "assemble",
    "count_pixels",
    "decode_mask",
    "finish",
    "validate_classes",
    "write_seg_shard",
]
