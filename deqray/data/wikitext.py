"""WikiText-103 / WikiText-2 (word level) -> parquet shards of token ids, with Ray Data.

Conventions (those of the Transformer-XL / DEQ corpus code, made exact):

* A line is what `open(path, encoding="utf-8", newline="\\n")` yields: text up
  to and including a "\\n" (a final line without one still counts). A "\\r"
  before the "\\n" is whitespace, so CRLF files give the same tokens.
* The words of a line are `line.split()` (any Unicode whitespace), and every
  line, blank ones included, is followed by `<eos>`. WikiText's blank lines
  between paragraphs therefore become lone `<eos>` tokens, as in the reference
  code, where `"".split()` is `[]` and `<eos>` is appended regardless.
* The vocabulary comes from the training split only, `<eos>` counted like any
  word. It is ordered by count (descending), ties by first occurrence in the
  training file: exactly `collections.Counter(train_tokens).most_common()`.
  `<unk>` (which WikiText uses for its own rare words) is an ordinary word;
  if the training split lacks it, it is added last with count 0, so that every
  valid/test word outside the vocabulary has an id. Those replacements are
  counted per split (`unknown`). (Transformer-XL's own vocabulary puts an
  uncounted `<eos>` at id 0 instead; the tokens are the same, the ids differ.)

Output (see `manifest`): `vocab.txt` (one `word<TAB>count` per line, in id
order), `<split>/shard-CCCCC-PPP.parquet` with one int32 column `token`, one
row per token, in stream order (shard names sort in stream order; the
manifest lists them in order), and `manifest.json` written last.

How the work is spread (Ray Data): each split file is cut into chunks of
`chunk_bytes`; a chunk owns the lines that start inside its byte range, so
chunks are read independently (also from object storage) without the driver
touching the text. Pass 1 (`map_batches`, one task per chunk) reads and
checks the text (UTF-8), counts lines and words, and encodes the tokens as
ids into the chunk's own word list; that dataset is materialized, so these
ids (4 bytes a token) wait in the object store while only the word counts
go to the driver, which merges them into the vocabulary. Pass 2 maps each
chunk's ids to the vocabulary's and writes its shards, named after the chunk
index, so tasks may finish in any order. The driver writes the manifest
last. The input is fully checked (pass 1) before anything in `out` is
replaced, so bad input never costs a finished output.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ._fs import DataError, Location, locate, retrying
from .manifest import (
    Manifest,
    Shard,
    Split,
    check_reuse,
    load_manifest,
    prepare_output,
    write_manifest,
    write_shard,
)
from .progress import Meter

EOS = "<eos>"
UNK = "<unk>"
VOCAB_FILE = "vocab.txt"
TOKEN_COLUMN = "token"
SPLITS = ("train", "valid", "test")
# Row groups small enough that a reader wanting a slice of the stream (see
# deqray.data.lm) decodes little more than it needs.
ROW_GROUP_TOKENS = 1 << 16
_SCAN_BLOCK = 1 << 16


@dataclasses.dataclass(frozen=True)
class _Chunk:
    split: str
    index: int  # chunk number within the split: also the shard name prefix
    uri: str
    start: int  # byte range [start, end) in which the chunk's lines begin
    end: int
    size: int  # file size


# --------------------------------------------------------------------------- #
# locating the input
# --------------------------------------------------------------------------- #


def find_split_files(src: str | Location) -> dict[str, Location]:
    """The raw file of each split: `wiki.<split>.tokens`, else `<split>.txt`."""
    root = locate(src)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory (expected WikiText files)")
    files = {}
    for split in SPLITS:
        names = (f"wiki.{split}.tokens", f"{split}.txt")
        found = [root.join(n) for n in names if root.join(n).is_file()]
        if not found:
            raise DataError(f"{root}: missing the {split} split (looked for {' or '.join(names)})")
        files[split] = found[0]
        if found[0].size() == 0:
            raise DataError(f"{found[0]}: empty file (split {split!r})")
    return files


def _plan_chunks(files: dict[str, Location], chunk_bytes: int) -> list[_Chunk]:
    chunks = []
    for split, loc in files.items():
        size = loc.size()
        n = max(1, -(-size // chunk_bytes))
        step = -(-size // n)
        for i in range(n):
            chunks.append(_Chunk(split, i, loc.uri, i * step, min(size, (i + 1) * step), size))
    return chunks


# --------------------------------------------------------------------------- #
# work done in Ray Data tasks (module-level so that workers can import it)
# --------------------------------------------------------------------------- #


def _line_start_after(fh, pos: int, size: int) -> int:
    """Offset just past the first b"\\n" at or after `pos` (or `size`)."""
    while pos < size:
        block = fh.read_at(min(_SCAN_BLOCK, size - pos), pos)
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _read_chunk(chunk: _Chunk) -> tuple[int, bytes]:
    """The bytes of the lines that begin in [start, end), and where they begin."""
    return retrying("read", chunk.uri, lambda: _read_chunk_once(chunk))


def _read_chunk_once(chunk: _Chunk) -> tuple[int, bytes]:
    loc = locate(chunk.uri)
    with loc.fs.open_input_file(loc.path) as fh:
        # Two neighbouring chunks agree on their border: both look for the
        # first newline at or after border - 1.
        begin = 0 if chunk.start == 0 else _line_start_after(fh, chunk.start - 1, chunk.size)
        if begin >= chunk.end:  # one long line spans this whole chunk
            return begin, b""
        stop = (
            chunk.size
            if chunk.end >= chunk.size
            else _line_start_after(fh, chunk.end - 1, chunk.size)
        )
        return begin, fh.read_at(stop - begin, begin)


def _decode(begin: int, data: bytes) -> tuple[str | None, dict | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, {
            "offset": begin + e.start,
            "line_in_chunk": data.count(b"\n", 0, e.start),
            "reason": e.reason,
            "bytes": data[e.start : e.start + 4].hex(" "),
        }


def _tokens(text: str) -> tuple[list[str], int]:
    """The chunk's tokens with `<eos>` after every line, and its number of lines."""
    lines = text.count("\n")
    # Joining the lines' `split()`s equals splitting the whole text, since "\n"
    # is whitespace; marking the newlines first puts the `<eos>`s in place.
    words = text.replace("\n", f" {EOS} ").split()
    if text and not text.endswith("\n"):  # the file's last line has no newline
        lines += 1
        words.append(EOS)
    return words, lines


def _chunk_of(batch: dict[str, np.ndarray]) -> _Chunk:
    # one chunk per batch (batch_size=1); numpy scalars back to Python values
    fields = {f.name for f in dataclasses.fields(_Chunk)}
    return _Chunk(
        **{
            k: v[0].item() if isinstance(v[0], np.generic) else v[0]
            for k, v in batch.items()
            if k in fields
        }
    )


def _local_ids(words: list[str]) -> tuple[list[str], np.ndarray]:
    """The chunk's distinct words in order of first occurrence, and each token's index there."""
    first: dict[str, int] = {}
    # setdefault records the position of each word's first occurrence, at C speed
    pos = np.fromiter(map(first.setdefault, words, range(len(words))), np.int64, len(words))
    # first positions are increasing in insertion order: number them 0, 1, 2, ...
    dense = np.empty(len(words), np.int32)
    dense[np.fromiter(first.values(), np.int64, len(first))] = np.arange(len(first))
    return list(first), dense[pos]


def _count_batch(batch: dict[str, np.ndarray]) -> pa.Table:
    """Pass 1, one chunk: read and check the text, count lines and words, encode locally.

    The tokens leave as ids into the chunk's own word list; pass 2 maps them
    to the global vocabulary, so the text is read and split only once.
    """
    chunk = _chunk_of(batch)
    try:
        begin, data = _read_chunk(chunk)
    except DataError as e:  # the storage stayed unreachable: the driver raises it, by name
        begin, data, io_error = 0, b"", str(e)
    else:
        io_error = None
    text, error = _decode(begin, data)
    if io_error is not None:
        info, local = {"io_error": io_error}, np.zeros(0, np.int32)
    elif error is not None:
        info, local = {"error": error}, np.zeros(0, np.int32)
    else:
        words, lines = _tokens(text)
        del text
        distinct, local = _local_ids(words)
        info = {
            "begin": begin,
            "nbytes": len(data),
            "lines": lines,
            "tokens": len(words),
            "words": distinct,
            "counts": np.bincount(local, minlength=len(distinct)).tolist(),
        }
    return pa.table(
        {
            "split": [chunk.split],
            "index": [chunk.index],
            "info": [pickle.dumps(info)],
            "ids": pa.array([local.tobytes()], pa.large_binary()),
        }
    )


_VOCAB_CACHE: dict[str, dict[str, int]] = {}


def _word_ids(vocab_ref) -> dict[str, int]:
    import ray

    key = vocab_ref.hex()
    if key not in _VOCAB_CACHE:  # one lookup table per worker process and run
        _VOCAB_CACHE.clear()
        _VOCAB_CACHE[key] = {w: i for i, w in enumerate(ray.get(vocab_ref))}
    return _VOCAB_CACHE[key]


def _write_batch(
    batch: dict[str, np.ndarray], *, vocab_ref, unk_id: int, out_uri: str, shard_tokens: int
) -> pa.Table:
    """Pass 2, one chunk: global token ids, written as shards named after the chunk."""
    split, index = str(batch["split"][0]), int(batch["index"][0])
    info = pickle.loads(batch["info"][0])
    vocab = _word_ids(vocab_ref)
    to_global = np.fromiter(
        map(vocab.get, info["words"], itertools.repeat(-1)), np.int32, len(info["words"])
    )
    ids = to_global[np.frombuffer(batch["ids"][0], np.int32)]
    unknown = ids < 0
    n_unknown = int(unknown.sum())
    ids[unknown] = unk_id
    try:
        out = locate(out_uri)
        shards = [
            _write_tokens(
                out, f"{split}/shard-{index:05d}-{part:03d}.parquet", ids[lo : lo + shard_tokens]
            )
            for part, lo in enumerate(range(0, len(ids), shard_tokens))
        ]
    except DataError as e:
        # A Ray task's exception reaches the driver wrapped in Ray's types;
        # the driver raises this message as the DataError it is.
        result = {"io_error": str(e)}
    else:
        result = {"tokens": len(ids), "unknown": n_unknown, "shards": shards}
    return pa.table({"split": [split], "index": [index], "info": [pickle.dumps(result)]})


def _write_tokens(out: Location, relpath: str, ids: np.ndarray) -> Shard:
    """A token shard with small row groups (see ROW_GROUP_TOKENS)."""
    table = pa.table({TOKEN_COLUMN: pa.array(ids, pa.int32())})
    return write_shard(out, relpath, table, row_group_size=ROW_GROUP_TOKENS)


# --------------------------------------------------------------------------- #
# the driver
# --------------------------------------------------------------------------- #


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _results(ds, meter: Meter | None = None) -> dict[tuple[str, int], dict]:
    """The small `info` column of every chunk, by (split, index); each chunk counted
    by `meter` as it arrives (a pass that streams: the rows come as chunks finish)."""
    out = {}
    for row in ds.select_columns(["split", "index", "info"]).iter_rows():
        out[str(row["split"]), int(row["index"])] = pickle.loads(row["info"])
        if meter is not None:
            meter.add()
    return out


def _say(msg: str) -> None:
    print(f"[deqray.data.wikitext] {msg}", file=sys.stderr, flush=True)


def _raise_text_error(chunks: list[_Chunk], results: dict) -> None:
    """A clear error for the first chunk (in file order) that could not be read or is not UTF-8."""
    for c in chunks:
        if "io_error" in results[c.split, c.index]:
            raise DataError(results[c.split, c.index]["io_error"])
    for c in chunks:
        r = results[c.split, c.index]
        if "error" not in r:
            continue
        e = r["error"]
        before = sum(
            results[c.split, i].get("lines", 0) for i in range(c.index)
        )  # earlier chunks of the same file
        line = before + e["line_in_chunk"] + 1
        raise DataError(
            f"{c.uri}: not UTF-8 text at byte {e['offset']} (line {line}): {e['reason']} "
            f"(bytes {e['bytes']})"
        )


def build_vocab(train_counts: list[tuple[list[str], list[int]]]) -> tuple[list[str], list[int]]:
    """Merge per-chunk counts (chunks in file order) into the ordered vocabulary."""
    merged: dict[str, int] = {}
    for words, counts in train_counts:
        for w, c in zip(words, counts, strict=True):
            # dict insertion order = first occurrence over the whole file
            merged[w] = merged.get(w, 0) + c
    ranked = sorted(merged.items(), key=lambda wc: -wc[1])  # stable: ties keep first occurrence
    if UNK not in merged:
        ranked.append((UNK, 0))
    return [w for w, _ in ranked], [c for _, c in ranked]


def load_vocab(root: str | Location) -> list[str]:
    """The words of a preprocessed language data set, in id order."""
    loc = locate(root).join(VOCAB_FILE)
    if not loc.is_file():
        raise DataError(f"{loc}: no vocabulary file")
    text = loc.read_bytes().decode("utf-8")
    return [line.split("\t", 1)[0] for line in text.split("\n") if line]


def preprocess_wikitext(
    src: str | None,
    out: str,
    *,
    name: str = "wikitext-103",
    overwrite: bool = False,
    strict: bool = False,
    chunk_bytes: int = 16 << 20,
    shard_tokens: int = 1 << 22,
    progress: bool = True,
) -> Manifest:
    """Preprocess a WikiText directory `src` into `out` (local path or URI); see the module doc.

    chunk_bytes: raw text per Ray Data task; shard_tokens: most tokens per
    parquet shard (a chunk writes one or more). `strict` has no effect: text
    that is not UTF-8 is always an error, since replacing characters would
    change the counts. Returns the manifest (reused if `out` is complete and
    was made from the same source with the same options, unless `overwrite`).
    """
    del strict
    if src is None:
        raise DataError(f"{name}: --src (the directory of the raw WikiText files) is required")
    return _preprocess(
        locate(src),
        out,
        name=name,
        source=locate(src).uri,
        overwrite=overwrite,
        chunk_bytes=chunk_bytes,
        shard_tokens=shard_tokens,
        progress=progress,
    )


def _preprocess(
    src: Location,
    out: str,
    *,
    name: str,
    source: str,
    overwrite: bool,
    chunk_bytes: int,
    shard_tokens: int,
    progress: bool,
    meta: dict | None = None,
) -> Manifest:
    if chunk_bytes < 1 or shard_tokens < 1:
        raise DataError(
            f"chunk_bytes and shard_tokens must be positive ({chunk_bytes}, {shard_tokens})"
        )
    options = {"chunk_bytes": int(chunk_bytes), "shard_tokens": int(shard_tokens)}
    out_loc = locate(out)
    existing = _reusable(
        out_loc, overwrite, dataset=name, source=source, options=options, meta=meta
    )
    if existing is not None:
        return existing
    out_uri = out_loc.uri
    files = find_split_files(src)
    chunks = _plan_chunks(files, chunk_bytes)
    pin = _is_local(src.uri) or _is_local(out_uri)
    if progress:
        total = sum(loc.size() for loc in files.values())
        _say(f"{name}: {total / 1e6:.1f} MB in {len(chunks)} chunks from {src} -> {out_uri}")

    import ray
    from ray.data import DataContext

    from ._ray import connect

    connect()  # a no-op when Ray is up; else join a running cluster or start one
    remote_args: dict[str, Any] = {}
    if pin:
        # Local paths exist on this node only: keep the tasks here (as Ray
        # Data does for local://). URIs (s3://, gs://, file:// on a shared
        # mount) may be read on any node.
        remote_args["label_selector"] = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    ctx = DataContext.get_current()
    saved_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = bool(progress) and saved_bars
    try:
        t0 = time.perf_counter()
        items = [dataclasses.asdict(c) for c in chunks]
        # Pass 1 stays in the object store (materialize): its local ids are
        # pass 2's input; only the small per-chunk facts come to the driver.
        counted_ds = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(_count_batch, batch_size=1, batch_format="numpy", **remote_args)
            .materialize()
        )
        counted = _results(counted_ds)
        _raise_text_error(chunks, counted)
        if progress:
            _say(f"pass 1 (read, count): {time.perf_counter() - t0:.1f} s")
        by_split = {s: [c for c in chunks if c.split == s] for s in files}
        vocab, freq = build_vocab(
            [
                (counted[c.split, c.index]["words"], counted[c.split, c.index]["counts"])
                for c in by_split["train"]
            ]
        )
        ids = {w: i for i, w in enumerate(vocab)}
        stats = {}
        for split, cs in by_split.items():
            rs = [counted[c.split, c.index] for c in cs]
            unknown = sum(
                n for r in rs for w, n in zip(r["words"], r["counts"], strict=True) if w not in ids
            )
            stats[split] = {
                "file": files[split].uri.rsplit("/", 1)[-1],
                "bytes": files[split].size(),
                "lines": sum(r["lines"] for r in rs),
                "tokens": sum(r["tokens"] for r in rs),
                "unknown": unknown,
            }
        del counted

        # The input is sound: only now replace an old output (--overwrite).
        if overwrite:
            out_loc, _ = prepare_output(out, overwrite=True, owned=(VOCAB_FILE,))
        out_loc.join(VOCAB_FILE).write_bytes(
            "".join(f"{w}\t{c}\n" for w, c in zip(vocab, freq, strict=True)).encode("utf-8")
        )
        t0 = time.perf_counter()
        meter = Meter(f"{name} pass 2", len(chunks), "chunks written", enabled=progress)
        written = _results(
            counted_ds.map_batches(
                _write_batch,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={
                    "vocab_ref": ray.put(vocab),
                    "unk_id": ids[UNK],
                    "out_uri": out_loc.uri,
                    "shard_tokens": int(shard_tokens),
                },
                **remote_args,
            ),
            meter,
        )
        del counted_ds
        if progress:
            _say(f"pass 2 (encode, write): {time.perf_counter() - t0:.1f} s")
    finally:
        ctx.enable_progress_bars = saved_bars

    for c in chunks:  # a shard that could not be written: no manifest
        if "io_error" in written[c.split, c.index]:
            raise DataError(written[c.split, c.index]["io_error"])
    splits = {}
    for split, cs in by_split.items():
        rs = [written[c.split, c.index] for c in cs]
        got = {k: sum(r[k] for r in rs) for k in ("tokens", "unknown")}
        want = {k: stats[split][k] for k in got}
        if got != want:  # a bug, not bad input: refuse to write a wrong manifest
            raise RuntimeError(f"{files[split]}: pass 1 counted {want}, pass 2 wrote {got}")
        shards = [sh for r in rs for sh in r["shards"]]
        splits[split] = Split(rows=stats[split]["tokens"], shards=shards, stats=stats[split])

    manifest = Manifest(
        dataset=name,
        kind="lm",
        splits=splits,
        source=source,
        meta={
            "vocab_size": len(vocab),
            "vocab_file": VOCAB_FILE,
            "column": TOKEN_COLUMN,
            "dtype": "int32",
            "eos": EOS,
            "eos_id": ids[EOS],
            "unk": UNK,
            "unk_id": ids[UNK],
            "vocab_order": "count in train (with <eos>) descending, ties by first occurrence",
            "tokenization": "lines split on \\n; words by str.split(); <eos> after every line",
            "options": options,
            **(meta or {}),
        },
    )
    write_manifest(out_loc, manifest)
    m = load_manifest(out_loc, verify="none")
    if progress:
        for split, s in m.splits.items():
            _say(
                f"{split}: {s.stats['lines']:,} lines, {s.stats['tokens']:,} tokens, "
                f"{s.stats['unknown']:,} unknown, {len(s.shards)} shards"
            )
        _say(f"vocabulary: {len(vocab):,} words; manifest: {out_loc.join('manifest.json')}")
    return m


def _reusable(out: str | Location, overwrite: bool, **made_as) -> Manifest | None:
    """The finished output at `out` if it can be reused (else None); an error if it differs.

    Without `overwrite`, this also removes the leftovers of an interrupted run
    (prepare_output): they are not finished work. With `overwrite`, nothing is
    touched here: the old output is replaced only once the input has been read
    and found sound.
    """
    if overwrite:
        return None
    _, existing = prepare_output(out, owned=(VOCAB_FILE,))
    if existing is not None:
        check_reuse(existing, **made_as)
    return existing
