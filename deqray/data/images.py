"""Image data sets -> parquet shards of encoded images, on Ray Data.

    preprocess_imagenet("s3://bucket/imagenet", "s3://bucket/imagenet-parquet")
    preprocess_cifar10("~/cifar-10-batches-py", "~/data/cifar10")

Every image data set deqray writes (ImageNet, CIFAR-10, the embedded digits)
has the same shard schema, so one reader (`deqray.data.vision`) serves them all:

    image       binary   the encoded file: ImageNet's JPEG bytes as they were
                         on disk, PNG for data sets that arrive as pixel arrays
    label       int64    class index = position of the class name in the
                         sorted list of class names (manifest meta "classes")
    class_name  string
    index       int64    position of the image in its split's order (the
                         order the shards hold it in): a stable id, unique
                         in the split (a skipped, undecodable image leaves a gap)
    source      string   where it came from ("train/n01440764/x.JPEG",
                         "data_batch_3[417]")
    height, width int32  of the decoded image

How the work is spread: the driver only lists the source and plans the
shards (which images go into shard k of which split; shard names follow
from that plan, so they are deterministic). The plan becomes a Ray Dataset
with one row per job; `map_batches` runs each job as a Ray task that reads
its images, decodes every one to validate it, and writes its shard(s)
atomically. On a cluster the tasks spread over the nodes. The driver collects
the jobs' reports (rows, counts per class, skipped files, pixel sums) as they
finish, shows progress, and writes the manifest last.

Manifest: meta "classes" (index order), "mean"/"std" (training split, RGB
in [0, 1]), "image_size" ([H, W] when all images share it, else None),
"train_split", "options" (those that shape the output: a rerun into the
same --out with another --src or other options is refused, not silently
answered with the old shards; see `reuse_existing`); per split, stats
"class_counts" (every class, zeros included), "formats", "skipped" ({file,
error} of undecodable images), "raw_bytes" (source bytes read).

Why decode at preprocessing time: a corrupt JPEG found here is reported once,
by name, in the manifest; found by a training worker it would cost a crashed
epoch. The decode also yields the training split's per-channel mean and
standard deviation, which the readers use for normalisation.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ._fs import TMP_MARK, DataError, Location, locate
from .manifest import (
    MANIFEST,
    Manifest,
    Shard,
    Split,
    check_reuse,
    commit_output,
    load_manifest,
    prepare_output,
    stage_output,
    write_manifest,
    write_shard,
)
from .progress import Meter

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("index", pa.int64()),
        ("source", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)

MB = 1 << 20

# ImageNet: ~1,100 JPEGs a shard. Big enough that per-file overheads vanish,
# small enough that a 1000-shard training split spreads over many workers.
IMAGENET_SHARD_MB = 128
# CIFAR-10 counts raw pixel bytes (3,072 an image): 8 MB -> 2,730 images a
# shard, ~19 train shards, so even CIFAR reads in parallel.
CIFAR_SHARD_MB = 8
# Pixel statistics need not see every pixel of a 500x375 photo: a grid of
# about this many pixels a side per image estimates mean and std closely.
STATS_GRID = 64


# ----------------------------------------------------------------------------- shared pieces


class PixelStats:
    """Per-channel sums of 8-bit RGB pixels; exact integer arithmetic, mergeable.

    int64 holds ImageNet's sum of squares with room to spare (1.3M images x
    4,096 sampled pixels x 255^2 is about 3e14).
    """

    def __init__(self, total=(0, 0, 0), squares=(0, 0, 0), pixels=0):
        self.total = np.asarray(total, dtype=np.int64)
        self.squares = np.asarray(squares, dtype=np.int64)
        self.pixels = int(pixels)

    def add(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        step = max(1, min(h, w) // STATS_GRID)
        grid = rgb[::step, ::step].reshape(-1, 3).astype(np.int64)
        self.total += grid.sum(0)
        self.squares += (grid * grid).sum(0)
        self.pixels += grid.shape[0]

    def merge(self, other: PixelStats) -> None:
        self.total += other.total
        self.squares += other.squares
        self.pixels += other.pixels

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Mean and std of pixel values scaled to [0, 1], per channel (R, G, B)."""
        if not self.pixels:
            return [0.5] * 3, [0.25] * 3  # no image decoded: neutral values
        mean = self.total / self.pixels / 255
        var = np.maximum(self.squares / self.pixels / 255**2 - mean * mean, 0.0)
        std = np.maximum(np.sqrt(var), 1e-6)  # a constant channel must not divide by 0
        return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]

    def to_json(self) -> dict:
        return {
            "total": self.total.tolist(),
            "squares": self.squares.tolist(),
            "pixels": self.pixels,
        }


def decode_rgb(data: bytes) -> tuple[np.ndarray, str]:
    """Fully decode an encoded image; (H, W, 3) uint8 RGB and the format name.

    `load()` decodes every pixel, so a truncated or corrupt file fails here
    (PIL's `verify()` would only check the headers).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's own message names a BytesIO object, which tells the user nothing
        raise ValueError("not an image format PIL can read") from None
    with img:
        img.load()
        fmt = img.format or "unknown"
        return np.asarray(img.convert("RGB")), fmt


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) grey or (H, W, 3) RGB uint8 array: lossless, so pixels round-trip."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_table(rows: Sequence[dict]) -> pa.Table:
    """The shard table of a list of row dicts (keys = SCHEMA's names)."""
    return pa.table({name: [r[name] for r in rows] for name in SCHEMA.names}, schema=SCHEMA)


class ShardReport:
    """What one written shard contributes to the manifest; JSON-able to cross a Ray task."""

    def __init__(self, split: str, order: int):
        self.split = split
        self.order = order  # the shard's number in its split: orders the manifest's list
        self.shard: Shard | None = None
        self.class_counts: Counter = Counter()
        self.formats: Counter = Counter()
        self.skipped: list[dict] = []
        self.raw_bytes = 0
        self.stats = PixelStats()

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "order": self.order,
            "shard": None if self.shard is None else vars(self.shard),
            "class_counts": dict(self.class_counts),
            "formats": dict(self.formats),
            "skipped": self.skipped,
            "raw_bytes": self.raw_bytes,
            "stats": self.stats.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict) -> ShardReport:
        r = cls(d["split"], d["order"])
        r.shard = None if d["shard"] is None else Shard(**d["shard"])
        r.class_counts = Counter(d["class_counts"])
        r.formats = Counter(d["formats"])
        r.skipped = d["skipped"]
        r.raw_bytes = d["raw_bytes"]
        r.stats = PixelStats(**d["stats"])
        return r


def shard_name(split: str, order: int) -> str:
    return f"{split}/shard-{order:05d}.parquet"


def write_image_shard(out: Location, report: ShardReport, rows: list[dict]) -> None:
    """Write the rows as shard `report.order` of `report.split` (nothing if no row survived)."""
    if rows:
        report.shard = write_shard(out, shard_name(report.split, report.order), image_table(rows))


def run_jobs(
    jobs: list[dict],
    task: Callable[[dict], dict],
    *,
    what: str,
    unit: str,
    progress: bool,
    total_bytes: int = 0,
) -> list[dict]:
    """Run `task(job) -> report` for every job as Ray tasks through Ray Data; reports in job order.

    A job that finds bad input returns {"error": message} rather than raising:
    a Ray Data task failure arrives wrapped in Ray's own exception types, and
    the user should see our message, naming the file. The first error stops
    the run (the iteration is abandoned, Ray Data cancels what is left).
    """
    import ray.data

    if not jobs:
        return []
    # One block per job, so every job is its own task: a job is already sized
    # to be a sensible unit of work (a shard of images, a batch file).
    ds = ray.data.from_items(
        [{"job": json.dumps(j)} for j in jobs], override_num_blocks=len(jobs)
    ).map_batches(_run_job_batch, fn_kwargs={"task": task}, batch_size=1)
    reports: dict[int, dict] = {}
    # a line every few seconds (one per job would be thousands for ImageNet)
    meter = Meter(what, len(jobs), unit, total_bytes=total_bytes, enabled=progress)
    for row in ds.iter_rows():
        report = json.loads(row["report"])
        if report.get("error"):
            raise DataError(report["error"])
        reports[report["job"]] = report
        meter.add(nbytes=report.get("raw_bytes", 0))
    return [reports[i] for i in range(len(jobs))]


def _run_job_batch(batch: dict[str, np.ndarray], task: Callable[[dict], dict]) -> dict:
    out = []
    for text in batch["job"]:
        job = json.loads(text)
        try:
            report = task(job)
        except DataError as e:  # e.g. the storage stayed unreachable: named by the driver
            report = {"error": str(e)}
        report["job"] = job["job"]
        out.append(json.dumps(report))
    return {"report": np.array(out, dtype=object)}


def reuse_existing(
    out: str,
    dataset: str,
    overwrite: bool,
    progress: bool,
    *,
    source: str | None,
    options: dict[str, Any],
) -> Manifest | None:
    """The finished output at `out` when it can be reused, before the source is even looked at.

    Listing 1.28M ImageNet files only to find that the work is done would
    waste minutes; and checking the source first would make a finished output
    unusable once its source is gone. What is compared is what the output was
    made from: the data set, the source URI (None: not given, any will do)
    and the `options` recorded in its manifest (`finish`). A difference is
    an error naming it, since the old shards would silently answer a
    different question; `overwrite` redoes the output.
    """
    if overwrite or not locate(out).join(MANIFEST).is_file():
        return None
    _, existing = prepare_output(out)  # verifies shard sizes; names a damaged shard
    check_reuse(existing, dataset=dataset, source=source, options=options)
    if progress:
        print(
            f"[{dataset}] {locate(out).join(MANIFEST)} exists: reusing it (--overwrite to redo)",
            file=sys.stderr,
            flush=True,
        )
    return existing


def open_source(
    src: str | None,
    out: str,
    dataset: str,
    what: str,
    overwrite: bool,
    progress: bool,
    *,
    options: dict[str, Any],
) -> tuple[Manifest | None, Location | None]:
    """(finished output to reuse, None) or (None, the source directory, checked to exist)."""
    source = locate(src).uri if src else None
    existing = reuse_existing(out, dataset, overwrite, progress, source=source, options=options)
    if existing is not None:
        return existing, None
    if not src:
        raise DataError(f"{dataset}: --src is required ({what})")
    src_loc = locate(src)
    if not src_loc.is_dir():
        raise DataError(f"{src_loc}: not a directory")
    return None, src_loc


def assemble_splits(
    reports: Iterable[ShardReport], splits: Sequence[str], classes: list[str]
) -> tuple[dict[str, Split], PixelStats]:
    """Merge shard reports into the manifest's splits; and the training split's pixel stats."""
    by_split: dict[str, list[ShardReport]] = {s: [] for s in splits}
    for r in reports:
        by_split[r.split].append(r)
    out: dict[str, Split] = {}
    train_stats = PixelStats()
    for name, reps in by_split.items():
        reps.sort(key=lambda r: r.order)
        counts: Counter = Counter()
        formats: Counter = Counter()
        skipped: list[dict] = []
        raw = 0
        stats = PixelStats()
        for r in reps:
            counts.update(r.class_counts)
            formats.update(r.formats)
            skipped.extend(r.skipped)
            raw += r.raw_bytes
            stats.merge(r.stats)
        if name == splits[0]:
            train_stats = stats
        shards = [r.shard for r in reps if r.shard is not None]
        out[name] = Split(
            rows=sum(s.rows for s in shards),
            shards=shards,
            stats={
                # every class, in class-index order, zeros included: a class
                # missing from a split shows as 0 rather than silently absent
                "class_counts": {c: counts.get(c, 0) for c in classes},
                "formats": dict(sorted(formats.items())),
                "skipped": sorted(skipped, key=lambda s: s["file"]),
                "raw_bytes": raw,
            },
        )
    return out, train_stats


def finish(
    out_loc: Location,
    *,
    staged: Location | None = None,
    dataset: str,
    source: str,
    classes: list[str],
    splits: dict[str, Split],
    stats: PixelStats,
    meta: dict[str, Any],
    options: dict[str, Any],
    progress: bool,
) -> Manifest:
    """Write the manifest (last); `options` are those given to `reuse_existing`."""
    mean, std = stats.mean_std()
    manifest = Manifest(
        dataset=dataset,
        kind="vision",
        splits=splits,
        meta={
            "classes": classes,
            "num_classes": len(classes),
            "channels": 3,  # readers always decode to RGB
            "mean": mean,  # of the first (training) split, pixel values in [0, 1]
            "std": std,
            "columns": SCHEMA.names,
            **meta,
            "options": options,
        },
        source=source,
    )
    if staged is not None:  # --overwrite of a finished output: swap the new files in now
        commit_output(out_loc, staged)
    write_manifest(out_loc, manifest)  # last: its presence means the output is complete
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


# ----------------------------------------------------------------------------- ImageNet


def _visible(name: str) -> bool:
    # .DS_Store, editor droppings and our own temporary files are not images
    return not name.startswith(".") and not name.startswith(TMP_MARK)


def scan_class_folders(split: Location) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Class folder names and (class, path relative to the split, size) of every file.

    One recursive listing (paginated on object stores) rather than one call
    per folder. A file lying directly in the split folder has no class: error.
    """
    if not split.is_dir():
        raise DataError(f"{split}: missing split folder (expected {split}/<class>/<images>)")
    infos = split.fs.get_file_info(pafs.FileSelector(split.path, recursive=True))
    base = split.path.rstrip("/") + "/"
    classes: set[str] = set()
    files: list[tuple[str, str, int]] = []
    loose: list[str] = []
    for info in infos:
        rel = info.path[len(base) :] if info.path.startswith(base) else info.path
        parts = rel.split("/")
        if not all(_visible(p) for p in parts):
            continue
        if info.type == pafs.FileType.Directory:
            if len(parts) == 1:
                classes.add(parts[0])
        elif info.type == pafs.FileType.File:
            if len(parts) == 1:
                loose.append(rel)
            else:
                classes.add(parts[0])
                files.append((parts[0], rel, int(info.size)))
    if loose:
        raise DataError(
            f"{split}: files outside class folders ({', '.join(sorted(loose)[:3])}"
            f"{', ...' if len(loose) > 3 else ''}); expected {split}/<class>/<images>"
        )
    files.sort(key=lambda f: f[1])
    return sorted(classes), files


def plan_shards(sizes: Sequence[int], shard_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over files in order, each holding about `shard_bytes` of input."""
    ranges, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and acc + size > shard_bytes:
            ranges.append((start, i))
            start, acc = i, 0
        acc += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def preprocess_imagenet(
    src: str | None,
    out: str,
    *,
    overwrite: bool = False,
    strict: bool = False,
    shard_mb: float = IMAGENET_SHARD_MB,
    splits: Sequence[str] | str = ("train", "val"),
    seed: int = 0,
    progress: bool = True,
) -> Manifest:
    """ImageNet-style class folders (`<src>/train/<wnid>/*.JPEG`, `<src>/val/<wnid>/*`) -> shards.

    The classes are the training split's folder names, sorted; a class folder
    in another split that is not in train is an error (its label would not
    exist). The training split is shuffled once (with `seed`) before it is
    cut into shards, so every shard mixes the classes and a reader needs only
    a block-order shuffle and a small buffer; other splits keep sorted order.
    An image that fails to decode is skipped and listed in the manifest
    (split stats "skipped"), or with `strict` ends the run naming it.
    The image bytes are stored as they were (no re-encoding).
    """
    splits = _as_splits(splits)
    # strict shapes the output too: without it, bad images are skipped, not fatal
    options = {"shard_mb": float(shard_mb), "splits": splits, "seed": int(seed)}
    options["strict"] = bool(strict)
    existing, src_loc = open_source(
        src,
        out,
        "imagenet",
        "the folder holding train/ and val/",
        overwrite,
        progress,
        options=options,
    )
    if existing is not None:
        return existing
    # Everything about the source is checked before the output is touched, so
    # a wrong --src cannot cost a finished output (--overwrite included).
    listing = {}
    for name in splits:
        listing[name] = scan_class_folders(src_loc.join(name))
    classes = listing[splits[0]][0]
    if not listing[splits[0]][1]:
        raise DataError(f"{src_loc.join(splits[0])}: no image files in its class folders")
    for name in splits[1:]:
        unknown = sorted(set(listing[name][0]) - set(classes))
        if unknown:
            raise DataError(
                f"{src_loc.join(name, unknown[0])}: class folder in {name!r} is not in "
                f"{splits[0]!r} ({len(unknown)} such: {', '.join(unknown[:5])}"
                f"{', ...' if len(unknown) > 5 else ''}); its images would have no label"
            )
    label = {c: i for i, c in enumerate(classes)}

    out_loc, write_loc = stage_output(out, overwrite=overwrite)
    jobs = []
    total_bytes = 0
    for name in splits:
        files = listing[name][1]
        if name == splits[0]:
            order = np.random.default_rng(seed).permutation(len(files))
            files = [files[i] for i in order]
        total_bytes += sum(f[2] for f in files)
        for k, (lo, hi) in enumerate(plan_shards([f[2] for f in files], int(shard_mb * MB))):
            jobs.append(
                {
                    "job": len(jobs),
                    "split": name,
                    "order": k,
                    "src": src_loc.join(name).uri,
                    "out": write_loc.uri,
                    "strict": strict,
                    # (class, relative path, label, index in split)
                    "files": [
                        (c, rel, label[c], lo + j) for j, (c, rel, _) in enumerate(files[lo:hi])
                    ],
                }
            )
    if progress:
        print(
            f"[imagenet] {len(classes)} classes, "
            + ", ".join(f"{n}: {len(listing[n][1]):,} files" for n in splits)
            + f", {total_bytes / MB:,.1f} MB in {len(jobs)} shards",
            file=sys.stderr,
            flush=True,
        )
    reports = run_jobs(
        jobs,
        _imagenet_shard,
        what="imagenet",
        unit="shards written",
        progress=progress,
        total_bytes=total_bytes,
    )
    split_info, stats = assemble_splits(
        (ShardReport.from_json(r) for r in reports), splits, classes
    )
    return finish(
        out_loc,
        staged=write_loc,
        dataset="imagenet",
        source=src_loc.uri,
        classes=classes,
        splits=split_info,
        stats=stats,
        meta={
            "image_size": None,
            "shard_mb": shard_mb,
            "shuffle_seed": seed,
            "train_split": splits[0],
        },
        options=options,
        progress=progress,
    )


def _imagenet_shard(job: dict) -> dict:
    """Ray task: read, decode-check and write one shard of class-folder images."""
    src = locate(job["src"])
    out = locate(job["out"])
    report = ShardReport(job["split"], job["order"])
    rows = []
    for cls, rel, label, index in job["files"]:
        where = f"{job['split']}/{rel}"
        try:
            data = src.join(*rel.split("/")).read_bytes()
            report.raw_bytes += len(data)
            rgb, fmt = decode_rgb(data)
        except Exception as e:  # PIL raises many types for bad files; all mean "unusable"
            reason = f"{type(e).__name__}: {e}"
            if job["strict"]:
                return {"error": f"{src.join(*rel.split('/'))}: cannot decode image ({reason})"}
            report.skipped.append({"file": where, "error": reason})
            continue
        report.stats.add(rgb)
        report.class_counts[cls] += 1
        report.formats[fmt] += 1
        rows.append(
            {
                "image": data,
                "label": label,
                "class_name": cls,
                "index": index,
                "source": where,
                "height": rgb.shape[0],
                "width": rgb.shape[1],
            }
        )
    write_image_shard(out, report, rows)
    return report.to_json()


def _as_splits(splits: Sequence[str] | str) -> list[str]:
    # `deqray preprocess --set splits=train` arrives as a string
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s]
    if not splits:
        raise DataError("splits: at least one split (the first is the training split)")
    return list(splits)


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_META = "batches.meta"
CIFAR_SIDE = 32

# What the CIFAR pickles need: numpy arrays and (for Python-2 era pickles)
# byte strings. Nothing else is allowed to load, so a hostile pickle cannot
# run code the way a plain pickle.load would let it.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("__builtin__", "bytes"),  # Python 2 name, as protocol-2 pickles spell it
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_cifar_pickle(loc: Location) -> dict:
    """A CIFAR batch file as a dict with str keys (the originals have bytes keys)."""
    if not loc.is_file():
        raise DataError(f"{loc}: missing CIFAR-10 batch file")
    try:
        d = _ArraysOnlyUnpickler(io.BytesIO(loc.read_bytes()), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{loc}: not a CIFAR-10 python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{loc}: not a CIFAR-10 python pickle (a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def cifar_arrays(loc: Location, d: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) source labels of a batch, checked."""
    if "data" not in d or "labels" not in d:
        raise DataError(f"{loc}: CIFAR-10 batch without 'data' and 'labels' (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"])
    side2 = CIFAR_SIDE * CIFAR_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side2:
        raise DataError(
            f"{loc}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {3 * side2})"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(f"{loc}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{loc}: labels outside 0..{num_classes - 1} "
            f"(found {int(labels.min())}..{int(labels.max())})"
        )
    # rows are the R plane, then G, then B, each 32x32 row-major
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def preprocess_cifar10(
    src: str | None,
    out: str,
    *,
    overwrite: bool = False,
    strict: bool = False,
    shard_mb: float = CIFAR_SHARD_MB,
    progress: bool = True,
) -> Manifest:
    """The CIFAR-10 python batches (`data_batch_1..5`, `test_batch`, `batches.meta`) -> shards.

    Splits "train" (data_batch_1..5 in order) and "test". Images become PNG
    (lossless: decoded pixels equal the source arrays). Class index = rank
    of the label name in sorted order, like every deqray image set; for the
    real CIFAR-10 the label names are already in sorted order, so these are
    the usual CIFAR-10 labels. `shard_mb` counts raw pixel bytes (3,072 an
    image); shards never straddle two batch files. `strict` changes nothing:
    arrays cannot fail to decode, and a malformed batch file is always an error.
    """
    options = {"shard_mb": float(shard_mb)}
    existing, src_loc = open_source(
        src,
        out,
        "cifar10",
        "the cifar-10-batches-py folder",
        overwrite,
        progress,
        options=options,
    )
    if existing is not None:
        return existing
    wanted = [CIFAR_META] + [f for files in CIFAR_SPLITS.values() for f in files]
    missing = [f for f in wanted if not src_loc.join(f).is_file()]
    if missing:
        raise DataError(
            f"{src_loc}: missing CIFAR-10 file(s) {', '.join(missing)} "
            f"(expected {', '.join(wanted)})"
        )
    meta_loc = src_loc.join(CIFAR_META)
    names = load_cifar_pickle(meta_loc).get("label_names")
    if not names:
        raise DataError(f"{meta_loc}: no 'label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(set(names)) != len(names):
        raise DataError(f"{meta_loc}: repeated label names {names}")
    classes = sorted(names)
    remap = [classes.index(n) for n in names]  # source label -> deqray label

    # Pass 1, a Ray task per batch file: check it and count its rows, so the
    # shard plan (and names) can be fixed before anything is written; a
    # malformed batch file then fails the run with the output untouched.
    files = [(split, f) for split, fs in CIFAR_SPLITS.items() for f in fs]
    checks = run_jobs(
        [
            {"job": i, "file": src_loc.join(f).uri, "num_classes": len(names)}
            for i, (_, f) in enumerate(files)
        ],
        _cifar_check,
        what="cifar10",
        unit="batch files checked",
        progress=progress,
    )
    out_loc, write_loc = stage_output(out, overwrite=overwrite)
    per_shard = max(1, int(shard_mb * MB) // (3 * CIFAR_SIDE * CIFAR_SIDE))
    jobs = []
    next_order = dict.fromkeys(CIFAR_SPLITS, 0)
    next_index = dict.fromkeys(CIFAR_SPLITS, 0)
    for (split, f), check in zip(files, checks, strict=True):
        n = check["rows"]
        pieces = max(1, math.ceil(n / per_shard))
        bounds = [round(i * n / pieces) for i in range(pieces + 1)]  # near-equal shards
        jobs.append(
            {
                "job": len(jobs),
                "split": split,
                "file": src_loc.join(f).uri,
                "name": f,
                "out": write_loc.uri,
                "classes": classes,
                "remap": remap,
                "first_index": next_index[split],
                # (shard order, start row, stop row) within this file
                "shards": [
                    (next_order[split] + k, bounds[k], bounds[k + 1]) for k in range(pieces)
                ],
            }
        )
        next_order[split] += pieces
        next_index[split] += n
    total = sum(c["rows"] for c in checks) * 3 * CIFAR_SIDE * CIFAR_SIDE
    reports = run_jobs(
        jobs,
        _cifar_shards,
        what="cifar10",
        unit="batch files encoded",
        progress=progress,
        total_bytes=total,
    )
    split_info, stats = assemble_splits(
        (ShardReport.from_json(s) for r in reports for s in r["shards"]),
        list(CIFAR_SPLITS),
        classes,
    )
    return finish(
        out_loc,
        staged=write_loc,
        dataset="cifar10",
        source=src_loc.uri,
        classes=classes,
        splits=split_info,
        stats=stats,
        meta={
            "image_size": [CIFAR_SIDE, CIFAR_SIDE],
            "source_label_names": names,
            "shard_mb": shard_mb,
            "train_split": "train",
        },
        options=options,
        progress=progress,
    )


def _cifar_check(job: dict) -> dict:
    loc = locate(job["file"])
    try:
        images, _ = cifar_arrays(loc, load_cifar_pickle(loc), job["num_classes"])
    except DataError as e:
        return {"error": str(e)}
    return {"rows": int(images.shape[0])}


def _cifar_shards(job: dict) -> dict:
    """Ray task: encode one CIFAR batch file's images as PNG and write its shards."""
    loc = locate(job["file"])
    out = locate(job["out"])
    try:
        images, labels = cifar_arrays(loc, load_cifar_pickle(loc), len(job["classes"]))
    except DataError as e:  # changed since the check pass
        return {"error": str(e)}
    raw = 0
    shards = []
    for order, lo, hi in job["shards"]:
        report = ShardReport(job["split"], order)
        rows = []
        for i in range(lo, hi):
            label = job["remap"][labels[i]]
            report.stats.add(images[i])
            report.class_counts[job["classes"][label]] += 1
            report.formats["PNG"] += 1
            rows.append(
                {
                    "image": encode_png(images[i]),
                    "label": label,
                    "class_name": job["classes"][label],
                    "index": job["first_index"] + i,
                    "source": f"{job['name']}[{i}]",
                    "height": CIFAR_SIDE,
                    "width": CIFAR_SIDE,
                }
            )
        report.raw_bytes = images[lo:hi].nbytes
        raw += report.raw_bytes
        write_image_shard(out, report, rows)
        shards.append(report.to_json())
    return {"shards": shards, "raw_bytes": raw}


__all__ = [
    "SCHEMA",
    "PixelStats",
    "decode_rgb",
    "encode_png",
    "image_table",
    "preprocess_cifar10",
    "preprocess_imagenet",
]
