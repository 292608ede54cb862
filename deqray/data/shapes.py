"""The embedded segmentation set: generated shapes whose class is known at every pixel.

No download: every image is drawn from a seeded numpy generator and written
in the segmentation shard format (`deqray.data.masks`), so the quickstart and
the tests read it through the same reader a Cityscapes run uses.

An image (`size` x `size`, RGB) has a dark background of a random colour
(every channel below 110) and 1..`max_shapes` shapes painted over it in
turn, each a square, a disk or an upright triangle of random extent
(a quarter to a half of the side) and position; a later shape hides what it
covers. The mask is exactly what was painted last at each pixel: class 0
"background", 1 "square", 2 "disk", 3 "triangle". There is no anti-aliasing,
so no pixel is shared. Gaussian noise of std `noise` (on the 0..255 scale)
covers the whole image.

With `colour_cue` (the default) a shape's colour is its class's (red
squares, green disks, blue triangles, each shape's brightness jittered by up
to 30 per channel): a tiny MDEQ segmenter learns it in a few hundred CPU
steps, which is what the quickstart needs. Without it every shape gets a
random bright colour (every channel from 140), and only the geometry tells
the classes apart: a harder set, for models that must use spatial context.

Splits "train" and "test" come from independent streams of the one seed, so
the test images are never training images (beyond chance) and every machine
writes the same bytes. Small enough to be written in the calling process.
"""

from __future__ import annotations

import sys

import numpy as np

from ._fs import DataError
from .cityscapes import REFERENCE_AUGMENT
from .images import ShardReport, encode_png, reuse_existing
from .manifest import Manifest, prepare_output
from .masks import assemble, count_pixels, finish, write_seg_shard

SHAPE_CLASSES = ["background", "square", "disk", "triangle"]
CLASS_COLOURS = {1: (200, 60, 60), 2: (60, 200, 60), 3: (60, 60, 200)}
BACKGROUND_MAX = 110  # exclusive bound of a background channel
BRIGHT_MIN = 140  # without colour_cue, the least value of a shape's channel
JITTER = 30
SOURCE = "deqray.data.shapes (generated)"


def shape_mask(kind: int, extent: int, top: int, left: int, size: int) -> np.ndarray:
    """(size, size) bool: the pixels of a square / disk / triangle in the extent x extent box."""
    yy, xx = np.mgrid[0:size, 0:size]
    rows, cols = yy - top, xx - left
    inside = (rows >= 0) & (rows < extent) & (cols >= 0) & (cols < extent)
    if kind == 1:
        return inside
    centre = (extent - 1) / 2
    if kind == 2:
        return inside & ((rows - centre) ** 2 + (cols - centre) ** 2 <= (extent / 2) ** 2)
    if kind == 3:  # apex on the top row, base the whole bottom row
        return inside & (np.abs(cols - centre) <= (rows + 1) / 2)
    raise ValueError(f"shape kind {kind}: 1 square, 2 disk, 3 triangle")


def draw_image(
    rng: np.random.Generator, size: int, max_shapes: int, noise: float, colour_cue: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image and its (size, size) uint8 class mask."""
    canvas = np.empty((size, size, 3), np.float64)
    canvas[:] = rng.integers(0, BACKGROUND_MAX, 3)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(1, 4))
        extent = int(rng.integers(max(2, size // 4), size // 2 + 1))
        top, left = (int(v) for v in rng.integers(0, size - extent + 1, 2))
        where = shape_mask(kind, extent, top, left, size)
        if colour_cue:
            colour = np.asarray(CLASS_COLOURS[kind]) + rng.integers(-JITTER, JITTER + 1, 3)
        else:
            colour = rng.integers(BRIGHT_MIN, 256, 3)
        canvas[where] = colour
        mask[where] = kind
    canvas += rng.normal(0.0, noise, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask


def write_shapes(
    src: str | None = None,
    out: str | None = None,
    *,
    overwrite: bool = False,
    strict: bool = False,
    train_images: int = 512,
    test_images: int = 128,
    size: int = 32,
    max_shapes: int = 3,
    noise: float = 8.0,
    colour_cue: bool = True,
    seed: int = 0,
    shard_mb: float = 1.0,
    progress: bool = True,
) -> Manifest:
    """Generate the shapes set into `out` (splits "train", "test"); `src` is not used.

    `shard_mb` counts the encoded bytes (image + mask) per shard: the default
    512 + 128 images of 32 px are ~1.6 MB, one shard a split; pass less for
    several. `strict` has nothing to check: generated data is known good.
    """
    del strict
    if out is None:
        raise DataError("shapes: --out is required")
    if src:
        raise DataError(f"shapes: the images are generated; got --src {src!r}")
    for key, value, least in (
        ("train_images", train_images, 1),
        ("test_images", test_images, 1),
        ("size", size, 8),
        ("max_shapes", max_shapes, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise DataError(f"shapes: {key} must be an int >= {least}, got {value!r}")
    if not noise >= 0:
        raise DataError(f"shapes: noise must be >= 0, got {noise}")
    options = {
        "train_images": train_images,
        "test_images": test_images,
        "size": size,
        "max_shapes": max_shapes,
        "noise": float(noise),
        "colour_cue": bool(colour_cue),
        "seed": int(seed),
        "shard_mb": float(shard_mb),
    }
    existing = reuse_existing(out, "shapes", overwrite, progress, source=SOURCE, options=options)
    if existing is not None:
        return existing
    out_loc, _ = prepare_output(out, overwrite=overwrite)
    if progress:
        print(f"[shapes] writing {out_loc}", file=sys.stderr, flush=True)
    streams = np.random.SeedSequence(seed).spawn(2)
    reports = []
    for (split, n), stream in zip(
        (("train", train_images), ("test", test_images)), streams, strict=True
    ):
        rng = np.random.default_rng(stream)
        order, rows, used = 0, [], 0
        report = ShardReport(split, order)
        for index in range(n):
            rgb, mask = draw_image(rng, size, max_shapes, noise, colour_cue)
            image, encoded = encode_png(rgb), encode_png(mask)
            if rows and used + len(image) + len(encoded) > shard_mb * (1 << 20):
                write_seg_shard(out_loc, report, rows)
                reports.append(report)
                order, rows, used = order + 1, [], 0
                report = ShardReport(split, order)
            rows.append(
                {
                    "image": image,
                    "mask": encoded,
                    "index": index,
                    "source": f"shapes(seed={seed})/{split}[{index}]",
                    "height": size,
                    "width": size,
                }
            )
            used += len(image) + len(encoded)
            report.stats.add(rgb)
            report.formats["PNG"] += 1
            report.raw_bytes += rgb.nbytes + mask.nbytes
            count_pixels(report, mask, SHAPE_CLASSES)
        write_seg_shard(out_loc, report, rows)
        reports.append(report)
    splits, stats = assemble(reports, ["train", "test"], SHAPE_CLASSES)
    return finish(
        out_loc,
        dataset="shapes",
        source=SOURCE,
        classes=SHAPE_CLASSES,
        splits=splits,
        stats=stats,
        meta={
            "image_size": [size, size],
            # the reference's scale range and flip; the crop is the whole image
            "augment": {**REFERENCE_AUGMENT, "base_size": size, "crop_size": [size, size]},
            "train_split": "train",
        },
        options=options,
        progress=progress,
    )


__all__ = ["SHAPE_CLASSES", "draw_image", "shape_mask", "write_shapes"]
