"""Language-model data for Ray Train: ordered token streams with Transformer-XL lanes.

A model with memory (Transformer-XL `mems`) needs row b of every batch to be
the text that follows row b of the previous batch. Here is how that holds,
from the manifest to the worker loop.

Layout. A split is one stream of N tokens (the shards in manifest order).
With W workers and B rows per worker, the stream is cut into W * B *lanes*
of `lane_len = (N - 1) // (W * B)` input positions each: global lane
g = rank * B + b holds inputs [g * lane_len, (g + 1) * lane_len) and reads
one token more for the last target. Worker `rank` owns lanes rank*B ...
rank*B + B - 1: a contiguous part of the stream, disjoint from the other
workers' parts; together they cover positions [0, W * B * lane_len), and
every token from 1 to W * B * lane_len is a target exactly once. Fewer than
W * B tokens at the end (the remainder) are left out. All workers get the
same number of batches, so every rank calls `ray.train.report` equally often.

Order across workers. Ray Train's default `DataConfig` splits a dataset
with `streaming_split`, which hands blocks to whichever worker asks first:
no order, no contiguity. `LMDataConfig` (a `ray.train.DataConfig`)
instead builds, in `configure()`, one Ray Dataset per worker that reads only
that worker's lanes: `ray.data.range` over *pieces* (at most `piece_tokens`
tokens of one lane), ordered piece 0 of lanes 0..B-1, then piece 1 of lanes
0..B-1, ...; a `map_batches` task reads each piece's rows from the parquet
shards. The dataset runs with `preserve_order=True`, so the worker receives
pieces in that order and keeps at most about two pieces per lane. Every
piece carries its lane and stream position, and `iter_lm_batches` checks
them: an order violation is an error, never a silently scrambled memory.

Resources. The piece reads are Ray Data tasks that need `read_cpus` (default
0.25) CPUs while the train workers hold theirs. On a machine where the
workers would take every CPU (2 workers x 1 CPU on 2 cores) the reads could
never start: give the workers fractional CPUs, e.g.
`ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})`, so that
at least `read_cpus` stays free on some node.

Use:

    datasets, data_config = lm_ingest(root, batch_size=16)   # driver
    TorchTrainer(loop, datasets=datasets, dataset_config=data_config, ...)

    def loop(config):                                        # each worker
        for batch in iter_lm_batches(ray.train.get_dataset_shard("train"), tgt_len=150):
            out = model(batch.tokens, batch.targets, mems=mems)
"""

from __future__ import annotations

import bisect
import copy
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._fs import DataError, locate, retrying
from ._ray import read_concurrency
from .manifest import Manifest, load_manifest

try:  # subclassing needs Ray Train; the rest of this module works without it
    from ray.train import DataConfig as _DataConfig
except ImportError:  # pragma: no cover
    _DataConfig = object

DEFAULT_PIECE_TOKENS = 1 << 16  # one parquet row group of the wikitext shards
DEFAULT_READ_CPUS = 0.25


# --------------------------------------------------------------------------- #
# the stream and its lanes
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TokenStream:
    """One split's tokens: its shards in stream order and where each begins."""

    split: str
    uris: tuple[str, ...]
    starts: tuple[int, ...]  # stream position of each shard's first token
    tokens: int
    column: str = "token"
    sha256: tuple[str, ...] = ()  # names a shard's content: footers are cached by it

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str) -> TokenStream:
        if manifest.kind != "lm":
            raise DataError(f"{manifest.root}: a {manifest.kind!r} data set, not a language one")
        uris = manifest.shard_uris(split)
        shards = manifest.splits[split].shards
        rows = [s.rows for s in shards]
        starts = tuple(int(x) for x in np.cumsum([0, *rows[:-1]]))
        return cls(
            split=split,
            uris=tuple(uris),
            starts=starts,
            tokens=int(sum(rows)),
            column=manifest.meta.get("column", "token"),
            sha256=tuple(s.sha256 for s in shards),
        )


@dataclass(frozen=True)
class LaneLayout:
    """W * B lanes of `lane_len` inputs (see the module doc)."""

    tokens: int
    world_size: int
    batch_size: int
    lane_len: int

    def lane_start(self, rank: int, row: int) -> int:
        return (rank * self.batch_size + row) * self.lane_len


def lane_layout(tokens: int, world_size: int, batch_size: int) -> LaneLayout:
    lanes = world_size * batch_size
    if world_size < 1 or batch_size < 1:
        raise ValueError(f"world_size and batch_size must be >= 1 ({world_size}, {batch_size})")
    lane_len = (tokens - 1) // lanes
    if lane_len < 1:
        raise DataError(
            f"{tokens} tokens are too few for {world_size} workers x {batch_size} rows "
            "(each row needs at least 2 tokens)"
        )
    return LaneLayout(tokens, world_size, batch_size, lane_len)


# --------------------------------------------------------------------------- #
# reading pieces (runs in Ray Data tasks)
# --------------------------------------------------------------------------- #

_FOOTERS: dict[str, pq.FileMetaData] = {}


def _read_range(stream: TokenStream, lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) of the stream, reading only the row groups that hold them."""
    parts = []
    i = bisect.bisect_right(stream.starts, lo) - 1
    while lo < hi:
        uri, first = stream.uris[i], stream.starts[i]
        # Worker processes outlive a run: a footer is cached under the shard's
        # checksum, so a rewritten shard at the same path is never misread.
        key = f"{uri}#{stream.sha256[i] if stream.sha256 else ''}"
        loc = locate(uri)

        def read(loc=loc, key=key, first=first, lo=lo) -> tuple[np.ndarray, int]:
            with loc.fs.open_input_file(loc.path) as fh:
                if key not in _FOOTERS:
                    if len(_FOOTERS) > 256:
                        _FOOTERS.clear()
                    _FOOTERS[key] = pq.ParquetFile(fh).metadata
                pf = pq.ParquetFile(fh, metadata=_FOOTERS[key])
                md = pf.metadata
                rows = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
                rg_first = np.cumsum([0] + rows)
                end = min(hi, first + md.num_rows)
                a, b = lo - first, end - first  # rows of this shard
                g0 = int(np.searchsorted(rg_first, a, side="right")) - 1
                g1 = int(np.searchsorted(rg_first, b, side="left"))
                table = pf.read_row_groups(list(range(g0, g1)), columns=[stream.column])
                col = table.column(0).to_numpy()
                return col[a - rg_first[g0] : b - rg_first[g0]], end

        part, lo = retrying("read", uri, read)
        parts.append(part)
        i += 1
    return np.concatenate(parts).astype(np.int32, copy=False)


def _read_pieces(
    batch: dict[str, np.ndarray],
    *,
    stream: TokenStream,
    rank: int,
    world_size: int,
    batch_size: int,
    lane_len: int,
    piece: int,
) -> pa.Table:
    """Piece ids -> rows (lane, lanes, lane_start, start, lane_stop, tokens).

    Piece id t is piece t // B of lane t % B: ids run lane-fastest, so in id
    order a worker gets every lane's next piece before any lane's one after.
    """
    layout = LaneLayout(stream.tokens, world_size, batch_size, lane_len)
    lanes, firsts, starts, stops, arrays = [], [], [], [], []
    for t in batch["id"].tolist():
        j, b = divmod(t, batch_size)
        first = layout.lane_start(rank, b)
        stop = first + lane_len + 1  # one token past the inputs: the last target
        lo = first + j * piece
        hi = min(lo + piece, stop)
        lanes.append(b)
        firsts.append(first)
        starts.append(lo)
        stops.append(stop)
        arrays.append(_read_range(stream, lo, hi))
    offsets = np.cumsum([0, *map(len, arrays)]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays)))
    return pa.table(
        {
            "lane": pa.array(lanes, pa.int32()),
            "lanes": pa.array([batch_size] * len(lanes), pa.int32()),
            "lane_start": pa.array(firsts, pa.int64()),
            "start": pa.array(starts, pa.int64()),
            "lane_stop": pa.array(stops, pa.int64()),
            "tokens": tokens,
        }
    )


def lane_dataset(
    stream: TokenStream,
    *,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    piece_tokens: int = DEFAULT_PIECE_TOKENS,
    read_cpus: float = DEFAULT_READ_CPUS,
    node_id: str | None = None,
):
    """The Ray Dataset of worker `rank`'s lanes, in the order `iter_lm_batches` consumes.

    node_id: run the reads on that node (for shards on a local disk).
    """
    import ray

    layout = lane_layout(stream.tokens, world_size, batch_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    span = layout.lane_len + 1
    piece = max(1, min(int(piece_tokens), span))
    per_lane = -(-span // piece)
    extra: dict[str, Any] = {}
    if node_id is not None:
        extra["label_selector"] = {"ray.io/node-id": node_id}
    # The piece indices are made here, not by ray.data.range: its read task
    # takes a whole CPU, which on a small machine full of train workers (two
    # trials of a sweep on 2 CPUs) it may never get, and then nothing is read.
    ids = [{"id": i} for i in range(per_lane * batch_size)]
    ds = ray.data.from_items(ids, override_num_blocks=per_lane).map_batches(
        _read_pieces,
        batch_size=batch_size,  # one task reads piece j of every lane
        batch_format="numpy",
        num_cpus=read_cpus,
        concurrency=read_concurrency() if read_cpus == 0 else None,  # _ray.read_concurrency
        fn_kwargs={
            "stream": stream,
            "rank": rank,
            "world_size": world_size,
            "batch_size": batch_size,
            "lane_len": layout.lane_len,
            "piece": piece,
        },
        **extra,
    )
    ds.context.execution_options.preserve_order = True
    return ds


# --------------------------------------------------------------------------- #
# Ray Train
# --------------------------------------------------------------------------- #


class LMDataConfig(_DataConfig):
    """A `ray.train.DataConfig` giving each worker its own ordered lanes (module doc).

    root: a preprocessed language data set (manifest directory or URI).
    batch_size: rows per worker, one int or {split: int}.
    splits: the splits to serve (default: the keys of a batch_size dict, else all).
    datasets_to_split: splits cut among the workers ("all", or a list); a
      split not listed reaches every worker whole (laid out as for one worker).
    progress_bars: Ray Data's progress bars for the workers' reads (off).
    Datasets whose names are not splits of `root` are handled as by
    `ray.train.DataConfig`.
    """

    def __init__(
        self,
        root: str,
        batch_size: int | dict[str, int],
        *,
        splits: Iterable[str] | None = None,
        datasets_to_split="all",
        piece_tokens: int = DEFAULT_PIECE_TOKENS,
        read_cpus: float = DEFAULT_READ_CPUS,
        execution_options=None,
        verify: str = "size",
        progress_bars: bool = False,
    ):
        super().__init__(datasets_to_split=datasets_to_split, execution_options=execution_options)
        self.progress_bars = progress_bars
        manifest = load_manifest(root, verify=verify)
        if splits is not None:
            names = list(splits)
        elif isinstance(batch_size, dict):
            names = list(batch_size)
        else:
            names = list(manifest.splits)
        self.root = manifest.root
        self.vocab_size = int(manifest.meta.get("vocab_size", 0))
        self.streams = {s: TokenStream.from_manifest(manifest, s) for s in names}
        if isinstance(batch_size, dict):
            missing = [s for s in names if s not in batch_size]
            if missing:
                raise ValueError(f"batch_size has no entry for {', '.join(missing)}")
        self._batch = batch_size
        self.piece_tokens = int(piece_tokens)
        self.read_cpus = float(read_cpus)
        # Shards on a local disk can only be read on this node: pin the reads here.
        self.node_id = None
        if "://" not in self.root:
            import ray

            if ray.is_initialized():
                self.node_id = ray.get_runtime_context().get_node_id()

    def batch_size(self, split: str) -> int:
        return int(self._batch[split] if isinstance(self._batch, dict) else self._batch)

    def is_split(self, name: str) -> bool:
        return self._datasets_to_split == "all" or name in self._datasets_to_split

    def dataset(self, split: str, *, world_size: int = 1, rank: int = 0):
        return lane_dataset(
            self.streams[split],
            batch_size=self.batch_size(split),
            world_size=world_size,
            rank=rank,
            piece_tokens=self.piece_tokens,
            read_cpus=self.read_cpus,
            node_id=self.node_id,
        )

    def datasets(self) -> dict[str, Any]:
        """Every split laid out for one worker: what TorchTrainer(datasets=...) takes."""
        return {s: self.dataset(s) for s in self.streams}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        others = {}
        for name, ds in datasets.items():
            if name not in self.streams:
                others[name] = ds
                continue
            split = self.is_split(name)
            for rank in range(world_size):
                part = self.dataset(
                    name, world_size=world_size if split else 1, rank=rank if split else 0
                )
                # The user's options for this dataset if any, else those the
                # dataset was made with (the current DataContext's); in
                # both cases the order of the lanes is the point.
                user = self._get_user_execution_options(name)
                if user is not None:
                    part.context.execution_options = copy.deepcopy(user)
                part.context.execution_options.preserve_order = True
                # one bar per piece read and epoch would drown a training log
                part.context.enable_progress_bars = self.progress_bars
                part.set_name(f"{name}-rank{rank}")
                output[rank][name] = part.iterator()
        if others:
            rest = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
            for mine, theirs in zip(output, rest, strict=True):
                mine.update(theirs)
        return output


def lm_ingest(root: str, batch_size: int | dict[str, int], *, splits=("train", "valid"), **kw):
    """(datasets, dataset_config) for TorchTrainer: the one call a driver needs."""
    config = LMDataConfig(root, batch_size, splits=splits, **kw)
    return config.datasets(), config


def lm_datasets(root: str, batch_size: int | dict[str, int], *, splits=("train", "valid"), **kw):
    """Ray Datasets of a language data set's splits (each laid out for one worker)."""
    return LMDataConfig(root, batch_size, splits=splits, **kw).datasets()


# --------------------------------------------------------------------------- #
# the worker side
# --------------------------------------------------------------------------- #


class LMBatch(NamedTuple):
    tokens: Any  # (B, L) int64 tensor: the inputs
    targets: Any  # (B, L) int64 tensor: the next tokens
    positions: Any  # (B,) int64 tensor: stream position of tokens[:, 0]


def iter_lm_batches(
    shard,
    tgt_len: int,
    *,
    drop_last: bool = False,
    device=None,
    prefetch_batches: int = 2,
) -> Iterator[LMBatch]:
    """Batches of (B, tgt_len) segments; row b continues row b of the previous batch.

    shard: what `ray.train.get_dataset_shard(split)` returns under
    `LMDataConfig` (or a dataset from `lm_datasets`). The last batch is
    shorter when the lane length is not a multiple of tgt_len, unless
    `drop_last`.
    """
    import torch

    if tgt_len < 1:
        raise ValueError(f"tgt_len must be >= 1, got {tgt_len}")
    batches = shard.iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches
    )
    bufs: list[np.ndarray] = []  # per lane: tokens read, not yet consumed as inputs
    pos: list[int] = []  # per lane: stream position of bufs[b][0]
    left = 0  # inputs still to emit, the same for every lane

    def emit(n: int) -> LMBatch:
        x = np.stack([buf[:n] for buf in bufs]).astype(np.int64)
        y = np.stack([buf[1 : n + 1] for buf in bufs]).astype(np.int64)
        at = np.asarray(pos, np.int64)
        for b in range(len(bufs)):
            bufs[b] = bufs[b][n:]  # keeps the last target: the next batch's first input
            pos[b] += n
        out = LMBatch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(at))
        if device is not None:
            out = LMBatch(*(t.to(device, non_blocking=True) for t in out))
        return out

    for table in batches:
        if "lane" not in table.column_names:
            raise DataError(
                "this dataset shard is not laid out in lanes: pass "
                "dataset_config=LMDataConfig(...) (see deqray.data.lm.lm_ingest) to TorchTrainer"
            )
        col = {name: table.column(name).to_numpy() for name in ("lane", "start", "lane_start")}
        tok = table.column("tokens").combine_chunks()
        values, offsets = tok.values.to_numpy(), tok.offsets.to_numpy()
        if not bufs:
            n_lanes = int(table.column("lanes")[0].as_py())
            bufs = [values[:0]] * n_lanes
            pos = [-1] * n_lanes
            left = int(table.column("lane_stop")[0].as_py() - col["lane_start"][0]) - 1
        for k in range(table.num_rows):
            b, start = int(col["lane"][k]), int(col["start"][k])
            if pos[b] < 0:
                pos[b] = int(col["lane_start"][k])
            if start != pos[b] + len(bufs[b]):
                raise DataError(
                    f"lane {b}: expected stream position {pos[b] + len(bufs[b])}, got {start} "
                    "(pieces out of order: was preserve_order turned off?)"
                )
            piece = values[offsets[k] : offsets[k + 1]]
            bufs[b] = np.concatenate([bufs[b], piece]) if len(bufs[b]) else piece
        while left > 0:
            n = min(tgt_len, left)
            if any(len(buf) < n + 1 for buf in bufs):
                break  # wait for the next pieces
            if n < tgt_len and drop_last:
                return
            left -= n
            yield emit(n)
    if not bufs:
        raise DataError("the dataset shard yielded no tokens")
    if left > 0 or any(len(buf) != 1 for buf in bufs):
        raise DataError(f"the lanes ended early ({left} inputs missing)")


# --------------------------------------------------------------------------- #
# checking what a worker read (tests, benchmarks)
# --------------------------------------------------------------------------- #


def summarize_lm_batches(batches: Iterable[LMBatch], *, keep_tokens: bool = False) -> dict:
    """What a worker read, with the continuity checks a Transformer-XL memory relies on."""
    n, shapes, tokens_seen = 0, [], 0
    first = last = None
    continuous = shifted = True
    inputs: list[list[int]] = []
    prev = None
    for batch in batches:
        x, y, p = (t.cpu().numpy() for t in batch)
        shifted &= bool((y[:, :-1] == x[:, 1:]).all())
        if prev is not None:
            px, py, pp = prev
            continuous &= bool((p == pp + px.shape[1]).all() and (x[:, 0] == py[:, -1]).all())
        else:
            first = p.tolist()
            inputs = [[] for _ in range(x.shape[0])]
        if keep_tokens:
            for b in range(x.shape[0]):
                inputs[b].extend(x[b].tolist())
        prev = (x, y, p)
        last = (p + x.shape[1]).tolist()
        shapes.append(list(x.shape))
        tokens_seen += x.size
        n += 1
    out = {
        "batches": n,
        "shapes": shapes,
        "tokens": tokens_seen,
        "first_positions": first,
        "end_positions": last,  # one past the last input of each row
        "continuous": continuous,
        "targets_shifted": shifted,
        "last_targets": prev[1][:, -1].tolist() if prev is not None else None,
    }
    if keep_tokens:
        out["inputs"] = inputs
    return out


def lm_probe_loop(config: dict) -> None:
    """A Ray Train worker loop that reads its lanes and writes what it saw as JSON.

    config: out_dir (a directory every worker can write), tgt_len, splits
    (default ["train"]), epochs (default 1), keep_tokens (default False).
    Writes <out_dir>/rank-<r>.json: {split: [summary per epoch]}.
    """
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    seen: dict[str, list] = {}
    for split in config.get("splits", ["train"]):
        shard = ray.train.get_dataset_shard(split)
        seen[split] = [
            summarize_lm_batches(
                iter_lm_batches(shard, config["tgt_len"]),
                keep_tokens=config.get("keep_tokens", False),
            )
            for _ in range(config.get("epochs", 1))
        ]
    seen["world_size"] = ctx.get_world_size()
    os.makedirs(config["out_dir"], exist_ok=True)
    with open(os.path.join(config["out_dir"], f"rank-{rank}.json"), "w") as fh:
        json.dump(seen, fh)
    ray.train.report(
        {"batches": sum(s[0]["batches"] for k, s in seen.items() if k != "world_size")}
    )
