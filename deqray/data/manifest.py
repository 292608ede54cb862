"""The manifest of a preprocessed data set, and the output directory's life cycle.

Layout of an output directory:

    manifest.json            written last: its presence means "complete"
    <extra files>            e.g. vocab.txt
    <split>/shard-00000.parquet, ...

`manifest.json` records, per split, the shards (relative path, rows, bytes,
sha256) and the split's statistics; and, for the data set, facts such as the
vocabulary size or the class names, the source it was made from and the
options it was made with (meta "options"). `load_manifest` checks the shards
against it, so a truncated or altered shard is reported by name; and
`check_reuse` refuses to take a finished output for one made from another
source or with other options.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ._fs import TMP_MARK, DataError, Location, locate, retrying, sha256_bytes

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Shard:
    path: str  # relative to the output directory
    rows: int
    bytes: int
    sha256: str


@dataclass
class Split:
    rows: int = 0
    shards: list[Shard] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    dataset: str  # e.g. "wikitext-103", "imagenet", "cifar10", "digits", "markov"
    kind: str  # "lm" or "vision"
    splits: dict[str, Split] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    created: str = ""
    version: int = FORMAT_VERSION
    root: str = field(default="", compare=False)  # where it was loaded from (not stored)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            d = json.loads(text)
            splits = {
                name: Split(
                    rows=s["rows"],
                    shards=[Shard(**sh) for sh in s["shards"]],
                    stats=s.get("stats", {}),
                )
                for name, s in d.pop("splits").items()
            }
            return cls(splits=splits, **d)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: not a valid deqray manifest ({e})") from None

    def shard_uris(self, split: str) -> list[str]:
        """Full URIs of a split's shards, in order."""
        if split not in self.splits:
            raise DataError(
                f"{posixpath.join(self.root, MANIFEST)}: no split {split!r}; "
                f"splits: {', '.join(self.splits)}"
            )
        return [self.root.rstrip("/") + "/" + s.path for s in self.splits[split].shards]


def write_shard(out: Location, relpath: str, table: pa.Table, **parquet_options) -> Shard:
    """Write a parquet shard atomically and describe it for the manifest.

    `parquet_options` go to `pyarrow.parquet.write_table` (e.g. row_group_size,
    which bounds the smallest read a reader can make).
    """
    buf = io.BytesIO()
    pq.write_table(table, buf, **parquet_options)
    data = buf.getvalue()
    out.join(*relpath.split("/")).write_bytes(data)
    return Shard(path=relpath, rows=table.num_rows, bytes=len(data), sha256=sha256_bytes(data))


def write_manifest(out: Location, manifest: Manifest) -> None:
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.join(MANIFEST).write_bytes(manifest.to_json().encode())


def load_manifest(root: str | Location, *, verify: str = "size") -> Manifest:
    """Read `root/manifest.json` and check its shards.

    verify: "none"; "size" (every shard exists with the recorded size and a
    readable parquet footer with the recorded row count: catches truncation);
    or "checksum" (also the sha256 of every shard).
    """
    if verify not in ("none", "size", "checksum"):
        raise ValueError(f"verify must be 'none', 'size' or 'checksum', got {verify!r}")
    root = locate(root)
    mpath = root.join(MANIFEST)
    if not mpath.is_file():
        raise DataError(
            f"{mpath}: no manifest; preprocess the data first (`deqray preprocess ...`), "
            "or the run that wrote this directory did not finish"
        )
    m = Manifest.from_json(mpath.read_bytes().decode(), str(mpath))
    m.root = root.uri
    if m.version != FORMAT_VERSION:
        raise DataError(f"{mpath}: format version {m.version}, this deqray reads {FORMAT_VERSION}")
    if verify == "none":
        return m
    for split, info in m.splits.items():
        for sh in info.shards:
            loc = root.join(*sh.path.split("/"))
            if not loc.is_file():
                raise DataError(f"{loc}: shard of split {split!r} listed in {mpath} is missing")
            size = loc.size()
            if size != sh.bytes:
                raise DataError(
                    f"{loc}: {size} bytes, the manifest says {sh.bytes} (truncated or replaced)"
                )
            try:
                rows = retrying("read", loc.uri, lambda loc=loc: _footer_rows(loc))
            except (pa.ArrowInvalid, OSError) as e:
                if isinstance(e, DataError):  # the storage stayed unreachable
                    raise
                raise DataError(f"{loc}: not a readable parquet file ({e})") from None
            if rows != sh.rows:
                raise DataError(f"{loc}: {rows} rows, the manifest says {sh.rows}")
            if verify == "checksum" and loc.sha256() != sh.sha256:
                raise DataError(f"{loc}: checksum does not match {mpath}")
    return m


def _footer_rows(loc: Location) -> int:
    with loc.fs.open_input_file(loc.path) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def check_reuse(
    existing: Manifest,
    *,
    dataset: str,
    source: str | None,
    options: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> None:
    """Refuse a finished output made from another source or another way; else return.

    `source` is compared as a URI (a trailing "/" aside); None means "not
    given", which accepts any. `options` (recorded in meta "options") and
    every key of `meta` are compared value by value, floats to 1e-9 (derived
    figures such as a chain's entropy rate differ in the last bits between
    processes). The error names each differing key, dotted, with both values.
    """
    where = existing.root or "the output"
    if existing.dataset != dataset:
        raise DataError(
            f"{where}: holds the {existing.dataset!r} data set, not {dataset!r}; "
            "choose another --out (or --overwrite it)"
        )
    made: dict[str, Any] = {"options": existing.meta.get("options")}
    asked: dict[str, Any] = {"options": options}
    if source is not None:
        made["source"] = existing.source.rstrip("/")
        asked["source"] = source.rstrip("/")
    for key, value in (meta or {}).items():
        made[key] = existing.meta.get(key)
        asked[key] = value
    diff = _differences(made, asked, "")
    if diff:
        details = "; ".join(f"{k}: {_brief(a)} there, {_brief(b)} asked" for k, a, b in diff)
        raise DataError(
            f"{where}: holds a finished data set made differently ({details}); "
            "pass --overwrite to redo it, or choose another --out"
        )


def _differences(made: Any, asked: Any, key: str) -> list[tuple[str, Any, Any]]:
    """(dotted key, value there, value asked) for every leaf where two records differ."""
    if isinstance(made, dict) and isinstance(asked, dict):
        out = []
        for k in [*made, *(k for k in asked if k not in made)]:
            sub = f"{key}.{k}" if key else str(k)
            out += _differences(made.get(k), asked.get(k), sub)
        return out
    return [] if _same(made, asked) else [(key, made, asked)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return not _differences(a, b, "")
    return a == b


def _brief(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prepare_output(
    out: str | Location, *, overwrite: bool = False, owned: tuple[str, ...] = ()
) -> tuple[Location, Manifest | None]:
    """Get an output directory ready; return it and the finished manifest to reuse, if any.

    * A complete output (a manifest whose shards check out) is returned for
      reuse, unless `overwrite`.
    * Leftovers of an interrupted run (no manifest) are removed: temporary
      files, shard directories and the `owned` extra files. Anything else in
      the directory is an error, so that a wrong --out never deletes user data.
    """
    out = locate(out)
    if not out.exists():
        out.mkdir()
        return out, None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not overwrite and out.join(MANIFEST).is_file():
        try:
            return out, load_manifest(out, verify="size")
        except DataError as e:
            raise DataError(
                f"{e}\n(the output at {out} is damaged; pass --overwrite to redo it)"
            ) from None
    names = out.list()
    manifest_names = {MANIFEST, *owned}
    foreign = [
        n
        for n in names
        if n not in manifest_names and not n.startswith(TMP_MARK) and not _is_split_dir(out, n)
    ]
    if foreign:
        raise DataError(
            f"{out}: not empty and not a deqray data set (found {', '.join(foreign[:5])}); "
            "choose another --out"
        )
    if out.join(MANIFEST).is_file():  # overwrite: the manifest goes first
        out.join(MANIFEST).remove()
    for n in names:
        if n != MANIFEST:
            out.join(n).remove()
    return out, None


def _is_split_dir(out: Location, name: str) -> bool:
    loc = out.join(name)
    if not loc.is_dir():
        return False
    return all(n.startswith(("shard-", TMP_MARK)) for n in loc.list())


def stage_output(
    out: str | Location, *, overwrite: bool = False, owned: tuple[str, ...] = ()
) -> tuple[Location, Location]:
    """(final, write_here) for a run that must not lose a finished output if it fails.

    Without a finished output at `out`, both are `out` (after `prepare_output`
    cleaned any leftovers). With one and `overwrite`, the new files go to a
    staging directory inside `out` whose name marks it temporary; the old
    output stays complete until `commit_output` swaps the new one in, so a
    run that fails half way (bad input found late, a crash) loses nothing.
    """
    out = locate(out)
    finished = out.join(MANIFEST).is_file()
    if not (overwrite and finished):
        final, _ = prepare_output(out, overwrite=overwrite, owned=owned)
        return final, final
    for name in out.list():  # an earlier failed staging
        if name.startswith(TMP_MARK):
            out.join(name).remove()
    staging = out.join(f"{TMP_MARK}stage-{uuid.uuid4().hex}")
    staging.mkdir()
    return out, staging


def commit_output(final: Location, staged: Location, owned: tuple[str, ...] = ()) -> None:
    """Replace the old output at `final` with the files written under `staged`.

    The old manifest goes first, so that from then on nothing looks
    complete until the caller writes the new manifest.
    """
    if staged.path == final.path:
        return
    if final.join(MANIFEST).is_file():
        final.join(MANIFEST).remove()
    for name in final.list():
        if name == posixpath.basename(staged.path):
            continue
        if name in owned or _is_split_dir(final, name) or name.startswith(TMP_MARK):
            final.join(name).remove()
    selector = pafs.FileSelector(staged.path, recursive=True)
    infos = retrying("list", staged.uri, lambda: staged.fs.get_file_info(selector))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, staged.path)
        dest = final.join(*rel.split("/"))
        retrying("move", dest.uri, lambda info=info, dest=dest: _move(staged.fs, info.path, dest))
    staged.remove()


def _move(fs: pafs.FileSystem, src: str, dest: Location) -> None:
    if fs.get_file_info(src).type == pafs.FileType.NotFound:  # moved by an unacknowledged try
        if fs.get_file_info(dest.path).type == pafs.FileType.File:
            return
    fs.create_dir(posixpath.dirname(dest.path), recursive=True)
    fs.move(src, dest.path)
