"""Cityscapes (fine annotations) -> segmentation shards, on Ray Data.

    preprocess_cityscapes("~/data/cityscapes", "s3://bucket/cityscapes-parquet")

The source is the official layout of `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` unpacked side by side:

    <src>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    <src>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png

Each label id becomes its train id by the official table of the
`cityscapesscripts` package (`cityscapesscripts.helpers.labels`): the 19
evaluated classes become 0..18 in train-id order, every other id the ignore
label 255. The shards follow `deqray.data.masks`: the image's PNG bytes as
they were, the mapped mask as PNG. The manifest counts the pixels of every
class per split.

Bad input, named: an image without its labelIds file, a label whose size is
not the image's, a label holding an id the table does not know (or not one
8-bit channel), an image or label that does not decode. Each is skipped and
listed in the split's stats "skipped" ({file, error}), or, with `strict`,
ends the run naming the file (a missing label before anything is written).

Splits default to train and val. The public test split's labels are all
"unlabeled" (ignored), so it holds no training signal or score; pass
`splits="train,val,test"` to have its images in the same format anyway.

How the work is spread is ImageNet's (`deqray.data.images`): the driver lists
both trees and plans the shards, the training split shuffled once with
`seed`; one Ray task a shard decodes, checks, maps and writes; the manifest
last. Re-runs reuse a finished output; --overwrite stages the new one and
loses nothing if it fails.
"""

from __future__ import annotations

import io
import posixpath
import sys
from collections.abc import Sequence

import numpy as np
import pyarrow.fs as pafs

from ._fs import TMP_MARK, DataError, Location, locate
from .images import (
    MB,
    ShardReport,
    _as_splits,
    decode_rgb,
    encode_png,
    open_source,
    plan_shards,
    run_jobs,
)
from .manifest import Manifest, stage_output
from .masks import IGNORE, assemble, count_pixels, finish, write_seg_shard

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
# ~55 images (2 MB PNGs) a shard: ~54 training shards, so the read spreads over workers
SHARD_MB = 128
# The reference's training augmentation (MDEQ-Vision seg_mdeq_*.yaml): the long
# side scaled to 2048 x (0.5 + k/10), k = 0..16, a 512 x 1024 crop, a flip.
REFERENCE_AUGMENT = {
    "base_size": 2048,
    "crop_size": [512, 1024],
    "scales": [round(0.5 + k / 10, 1) for k in range(17)],
    "flip": 0.5,
}


def label_table() -> tuple[list[str], list[int]]:
    """(the 19 class names in train-id order, label id -> train id for ids 0..255, -1 unknown).

    From cityscapesscripts' official table: an id whose trainId is 255 or -1
    (not evaluated) maps to the ignore label.
    """
    from cityscapesscripts.helpers.labels import labels

    lut = [-1] * 256
    names: dict[int, str] = {}
    for label in labels:
        if not 0 <= label.id < 256:  # "license plate" has id -1: never in a labelIds PNG
            continue
        evaluated = 0 <= label.trainId < IGNORE
        lut[label.id] = label.trainId if evaluated else IGNORE
        if evaluated:
            names[label.trainId] = label.name
    if sorted(names) != list(range(len(names))):
        raise DataError(f"cityscapesscripts: train ids are not 0..N-1: {sorted(names)}")
    return [names[i] for i in range(len(names))], lut


def _listing(loc: Location, suffix: str) -> tuple[dict[str, int], list[str]]:
    """{"<city>/<stem>": size} of the files ending in `suffix`, and the unexpected files."""
    if not loc.is_dir():
        raise DataError(f"{loc}: missing folder (the official Cityscapes layout has it)")
    base = loc.path.rstrip("/") + "/"
    found, stray = {}, []
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base) :] if info.path.startswith(base) else info.path
        parts = rel.split("/")
        if any(p.startswith((".", TMP_MARK)) for p in parts):
            continue  # .DS_Store, our own temporary files
        if len(parts) == 2 and parts[1].endswith(suffix):
            found[f"{parts[0]}/{parts[1][: -len(suffix)]}"] = int(info.size)
        else:
            stray.append(rel)
    return found, sorted(stray)


def preprocess_cityscapes(
    src: str | None,
    out: str,
    *,
    overwrite: bool = False,
    strict: bool = False,
    splits: Sequence[str] | str = ("train", "val"),
    shard_mb: float = SHARD_MB,
    seed: int = 0,
    progress: bool = True,
) -> Manifest:
    """The official Cityscapes tree at `src` -> segmentation shards at `out` (see the module)."""
    splits = _as_splits(splits)
    # strict shapes the output too: without it, bad pairs are skipped, not fatal
    options = {"shard_mb": float(shard_mb), "splits": splits, "seed": int(seed)}
    options["strict"] = bool(strict)
    existing, src_loc = open_source(
        src,
        out,
        "cityscapes",
        "the folder holding leftImg8bit/ and gtFine/",
        overwrite,
        progress,
        options=options,
    )
    if existing is not None:
        return existing
    classes, lut = label_table()
    # Everything about the source is checked before the output is touched.
    plans: dict[str, list[tuple[str, str, int]]] = {}
    missing: dict[str, list[dict]] = {}
    for name in splits:
        images, stray = _listing(src_loc.join("leftImg8bit", name), IMAGE_SUFFIX)
        if stray:
            raise DataError(
                f"{src_loc.join('leftImg8bit', name)}: files that are not "
                f"<city>/<name>{IMAGE_SUFFIX} ({', '.join(stray[:3])}"
                f"{', ...' if len(stray) > 3 else ''})"
            )
        if not images:
            raise DataError(f"{src_loc.join('leftImg8bit', name)}: no *{IMAGE_SUFFIX} images")
        labels, _ = _listing(src_loc.join("gtFine", name), LABEL_SUFFIX)  # also _color.png etc.
        plans[name], missing[name] = [], []
        for key in sorted(images):
            image_rel = f"leftImg8bit/{name}/{key}{IMAGE_SUFFIX}"
            label_rel = f"gtFine/{name}/{key}{LABEL_SUFFIX}"
            if key not in labels:
                if strict:
                    raise DataError(
                        f"{src_loc.join(*image_rel.split('/'))}: no label file {label_rel}"
                    )
                missing[name].append({"file": image_rel, "error": f"no label file {label_rel}"})
                continue
            plans[name].append((image_rel, label_rel, images[key] + labels[key]))

    out_loc, write_loc = stage_output(out, overwrite=overwrite)
    jobs = []
    total_bytes = 0
    for name in splits:
        files = plans[name]
        if name == splits[0]:  # shuffled once, so every shard mixes the cities
            files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
        total_bytes += sum(f[2] for f in files)
        for k, (lo, hi) in enumerate(plan_shards([f[2] for f in files], int(shard_mb * MB))):
            jobs.append(
                {
                    "job": len(jobs),
                    "split": name,
                    "order": k,
                    "src": src_loc.uri,
                    "out": write_loc.uri,
                    "strict": strict,
                    "classes": classes,
                    "lut": lut,
                    # (image, label, index in split)
                    "files": [(im, lb, lo + j) for j, (im, lb, _) in enumerate(files[lo:hi])],
                }
            )
    if progress:
        print(
            f"[cityscapes] {len(classes)} classes, "
            + ", ".join(f"{n}: {len(plans[n]):,} images" for n in splits)
            + f", {total_bytes / MB:,.1f} MB in {len(jobs)} shards",
            file=sys.stderr,
            flush=True,
        )
    reports = run_jobs(
        jobs,
        _cityscapes_shard,
        what="cityscapes",
        unit="shards written",
        progress=progress,
        total_bytes=total_bytes,
    )
    shard_reports = [ShardReport.from_json(r) for r in reports]
    for name in splits:  # the images skipped at planning: a report without a shard
        planned = ShardReport(name, -1)
        planned.skipped = missing[name]
        shard_reports.append(planned)
    split_info, stats = assemble(shard_reports, splits, classes)
    sizes = {tuple(s) for r in reports for s in r["sizes"]}
    return finish(
        out_loc,
        staged=write_loc,
        dataset="cityscapes",
        source=src_loc.uri,
        classes=classes,
        splits=split_info,
        stats=stats,
        meta={
            "image_size": list(sizes.pop()) if len(sizes) == 1 else None,
            "augment": REFERENCE_AUGMENT,
            "label_table": "cityscapesscripts.helpers.labels (label id -> trainId)",
            "shard_mb": shard_mb,
            "shuffle_seed": seed,
            "train_split": splits[0],
        },
        options=options,
        progress=progress,
    )


def _map_label(data: bytes, size: tuple[int, int], lut: np.ndarray) -> np.ndarray:
    """A labelIds PNG -> (H, W) uint8 train ids; ValueError naming what is wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image format PIL can read") from None
    with img:
        img.load()
        # labelIds are 8-bit grey; 16-bit grey ("I;16", "I") would hold ids as well
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label ids are one channel, got a mode {img.mode} image")
        ids = np.asarray(img).astype(np.int64)
    if ids.shape != size:
        raise ValueError(f"label is {ids.shape[1]}x{ids.shape[0]}, the image {size[1]}x{size[0]}")
    unknown = [int(i) for i in np.unique(ids) if not 0 <= i < 256 or lut[i] < 0]
    if unknown:
        raise ValueError(
            f"unknown label id{'s' * (len(unknown) > 1)} {', '.join(map(str, unknown[:5]))} "
            "(not in cityscapesscripts' table)"
        )
    return lut[ids].astype(np.uint8)


def _cityscapes_shard(job: dict) -> dict:
    """Ray task: read, check, map and write one shard of image + label pairs."""
    src = locate(job["src"])
    out = locate(job["out"])
    lut = np.asarray(job["lut"], dtype=np.int64)
    report = ShardReport(job["split"], job["order"])
    rows, sizes = [], set()
    for image_rel, label_rel, index in job["files"]:
        where = image_rel
        try:
            stage = f"cannot decode image {image_rel}"
            image = src.join(*image_rel.split("/")).read_bytes()
            rgb, fmt = decode_rgb(image)
            stage = f"bad label {label_rel}"
            label = src.join(*label_rel.split("/")).read_bytes()
            report.raw_bytes += len(image) + len(label)
            train_ids = _map_label(label, rgb.shape[:2], lut)
        except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
            reason = f"{stage}: {type(e).__name__}: {e}"
            if job["strict"]:
                return {"error": f"{src.join(*where.split('/'))}: {reason}"}
            report.skipped.append({"file": where, "error": reason})
            continue
        report.stats.add(rgb)
        report.formats[fmt] += 1
        count_pixels(report, train_ids, job["classes"])
        sizes.add(rgb.shape[:2])
        rows.append(
            {
                "image": image,
                "mask": encode_png(train_ids),
                "index": index,
                "source": posixpath.relpath(image_rel, "leftImg8bit"),
                "height": rgb.shape[0],
                "width": rgb.shape[1],
            }
        )
    write_seg_shard(out, report, rows)
    return {**report.to_json(), "sizes": sorted(sizes)}


__all__ = ["REFERENCE_AUGMENT", "label_table", "preprocess_cityscapes"]
