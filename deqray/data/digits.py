"""The embedded vision data set: scikit-learn's 8x8 handwritten digits, no download.

1,797 real images (UCI "optical recognition of handwritten digits", bundled
with scikit-learn), written in the same shard format as ImageNet and CIFAR-10
(`deqray.data.images.SCHEMA`), so the quickstart and the tests exercise the
readers that a real run uses.

The source pixels are 0..16 intensities; they are stretched to 0..255 and
stored as 8x8 greyscale PNG (the readers decode to RGB, repeating the grey
level, because the models take 3 channels). The split is fixed: per class,
a seeded permutation puts `test_fraction` of the images in "test", so every
class appears in both splits in the same proportion, on every machine.

It is 1,797 tiny images, so it is written in the calling process: starting
Ray tasks for it would take longer than the work.
"""

from __future__ import annotations

import sys

import numpy as np

from ._fs import DataError
from .images import (
    ShardReport,
    assemble_splits,
    encode_png,
    finish,
    reuse_existing,
    write_image_shard,
)
from .manifest import Manifest, prepare_output

DIGIT_CLASSES = [str(d) for d in range(10)]  # "0".."9": sorted order = the digit's value
SIDE = 8
SOURCE = "sklearn.datasets.load_digits"


def digits_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the test images: `test_fraction` of each class, chosen by `seed`.

    numpy's PCG64 streams are stable across versions, so the split is too.
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen = rng.permutation(members)[: int(round(test_fraction * members.size))]
        test[chosen] = True
    return test


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 images in 0..255 and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


def write_digits(
    src: str | None = None,
    out: str | None = None,
    *,
    overwrite: bool = False,
    strict: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    shard_mb: float = 1.0,
    progress: bool = True,
) -> Manifest:
    """Write the digits to `out` as splits "train" and "test"; `src` is not used (bundled data).

    `shard_mb` counts the PNG bytes per shard (the whole set is ~0.2 MB: one
    shard a split by default; pass less to get several, e.g. for tests of
    sharded reading). `strict` has nothing to check: the data is known good.
    """
    if out is None:
        raise DataError("digits: --out is required")
    if src:
        raise DataError(f"digits: the data is bundled with scikit-learn; got --src {src!r}")
    if not 0 < test_fraction < 1:
        raise DataError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    options = {"test_fraction": float(test_fraction), "seed": int(seed)}
    options["shard_mb"] = float(shard_mb)
    existing = reuse_existing(out, "digits", overwrite, progress, source=SOURCE, options=options)
    if existing is not None:
        return existing
    images, labels = load_digits_uint8()
    test = digits_split(labels, test_fraction, seed)
    out_loc, _ = prepare_output(out, overwrite=overwrite)
    if progress:
        print(f"[digits] writing {out_loc}", file=sys.stderr, flush=True)
    reports = []
    for split, mask in (("train", ~test), ("test", test)):
        order = 0
        report, rows, size = ShardReport(split, order), [], 0
        for index, i in enumerate(np.flatnonzero(mask)):
            png = encode_png(images[i])
            if rows and size + len(png) > shard_mb * (1 << 20):
                write_image_shard(out_loc, report, rows)
                reports.append(report)
                order += 1
                report, rows, size = ShardReport(split, order), [], 0
            name = DIGIT_CLASSES[labels[i]]
            rows.append(
                {
                    "image": png,
                    "label": int(labels[i]),
                    "class_name": name,
                    "index": index,
                    "source": f"sklearn.datasets.load_digits[{i}]",
                    "height": SIDE,
                    "width": SIDE,
                }
            )
            size += len(png)
            report.class_counts[name] += 1
            report.formats["PNG"] += 1
            report.raw_bytes += images[i].nbytes
            report.stats.add(np.repeat(images[i][:, :, None], 3, axis=2))
        write_image_shard(out_loc, report, rows)
        reports.append(report)
    splits, stats = assemble_splits(reports, ["train", "test"], DIGIT_CLASSES)
    return finish(
        out_loc,
        dataset="digits",
        source=SOURCE,
        classes=DIGIT_CLASSES,
        splits=splits,
        stats=stats,
        meta={
            "image_size": [SIDE, SIDE],
            "test_fraction": test_fraction,
            "split_seed": seed,
            "train_split": "train",
        },
        options=options,
        progress=progress,
    )


__all__ = ["DIGIT_CLASSES", "digits_split", "load_digits_uint8", "write_digits"]
