"""WikiText preprocessing on Ray Data: exact counts against plain Python, round trips, safety."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deqray.data import DataError, load_manifest, preprocess
from deqray.data.wikitext import EOS, SPLITS, UNK, find_split_files, load_vocab, preprocess_wikitext

ROOT = Path(__file__).resolve().parents[1]
TINY = {"chunk_bytes": 97, "shard_tokens": 41, "progress": False}  # many chunks and shards

TRAIN = [
    " ",
    " = Valkyria Chronicles III = ",
    " ",
    " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) is a game . ",
    " The game began development in 2010 , carrying over a large portion of the work . ",
    " ",
    " = = Gameplay = = ",
    "",
    " As with previous <unk> Chronicles games , the game is a tactical role @-@ playing game . ",
    " naïve café — the the the 🙂 emoji\u00a0and\tno-break spaces , and a\u2028line separator . ",
    " " + " ".join(f"word{i % 13}" for i in range(60)) + " ",  # one line longer than a chunk
    " = = = Plot = = = ",
    " The game 's plot follows the Nameless , a penal military unit . ",
]
VALID = [
    " = Tower Building = ",
    " ",
    " The tower was built in 1905 by an unseen architect , the game says . ",
    " Zebras and <unk> and quokkas ",
    "",
]
TEST = [" = Robert Boulter = ", " ", " Robert Boulter is an English actor . ", " zzz yyy the "]


def write_wikitext(root: Path, *, layout="tokens", newline="\n", last_newline=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in zip(SPLITS, (TRAIN, VALID, TEST), strict=True):
        name = f"wiki.{split}.tokens" if layout == "tokens" else f"{split}.txt"
        text = newline.join(lines) + (newline if last_newline else "")
        (root / name).write_bytes(text.encode("utf-8"))
    return root


def reference(src: Path) -> dict:
    """The figures by a plain Python read of the files (the reference convention)."""
    streams, lines = {}, {}
    for split, path in find_split_files(src).items():
        tokens, n = [], 0
        with open(path.path, encoding="utf-8", newline="\n") as fh:
            for line in fh:
                tokens += line.split() + [EOS]
                n += 1
        streams[split], lines[split] = tokens, n
    ranked = Counter(streams["train"]).most_common()
    vocab = [w for w, _ in ranked] + ([] if UNK in streams["train"] else [UNK])
    freq = [c for _, c in ranked] + ([] if UNK in streams["train"] else [0])
    index = {w: i for i, w in enumerate(vocab)}
    ids = {s: [index.get(t, index[UNK]) for t in toks] for s, toks in streams.items()}
    unknown = {s: sum(t not in index for t in toks) for s, toks in streams.items()}
    return {"vocab": vocab, "freq": freq, "ids": ids, "lines": lines, "unknown": unknown}


def read_stream(manifest, split) -> np.ndarray:
    parts = [pq.read_table(u).column("token") for u in manifest.shard_uris(split)]
    assert all(str(p.type) == "int32" for p in parts)
    return np.concatenate([p.to_numpy() for p in parts])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_session):
    src = write_wikitext(tmp_path_factory.mktemp("wt") / "src")
    out = tmp_path_factory.mktemp("wt") / "out"
    manifest = preprocess_wikitext(str(src), str(out), name="wikitext-2", **TINY)
    return src, out, manifest


def test_counts_vocabulary_and_round_trip_match_plain_python(corpus):
    src, out, m = corpus
    ref = reference(src)
    assert m.dataset == "wikitext-2" and m.kind == "lm" and m.source == str(src)
    assert load_vocab(out) == ref["vocab"]
    vocab_lines = (out / "vocab.txt").read_text("utf-8").split("\n")[:-1]
    assert [int(x.split("\t")[1]) for x in vocab_lines] == ref["freq"]
    assert m.meta["vocab_size"] == len(ref["vocab"])
    assert m.meta["eos_id"] == ref["vocab"].index(EOS) and m.meta["unk_id"] == ref["vocab"].index(
        UNK
    )
    for split in SPLITS:
        stats = m.splits[split].stats
        assert stats["lines"] == ref["lines"][split], split
        assert stats["tokens"] == len(ref["ids"][split]) == m.splits[split].rows, split
        assert stats["unknown"] == ref["unknown"][split], split
        assert read_stream(m, split).tolist() == ref["ids"][split], split  # round trip, in order
    assert (
        ref["unknown"]["train"] == 0 and ref["unknown"]["valid"] > 0 and ref["unknown"]["test"] > 0
    )
    # the blank lines and the heading lines are there, each line closed by one <eos>
    assert m.splits["train"].stats["lines"] == len(TRAIN)
    assert m.splits["train"].stats["tokens"] == sum(len(x.split()) + 1 for x in TRAIN)
    load_manifest(out, verify="checksum")


def test_shards_keep_stream_order_and_chunking_does_not_matter(corpus, tmp_path):
    src, out, m = corpus
    shards = m.splits["train"].shards
    assert len(shards) > 5  # the tiny chunks and shards of the fixture
    assert [s.path for s in shards] == sorted(s.path for s in shards)
    assert all(0 < s.rows <= TINY["shard_tokens"] for s in shards)
    # one big chunk per file gives the same vocabulary and the same streams
    big = preprocess_wikitext(str(src), str(tmp_path / "big"), name="wikitext-2", progress=False)
    assert len(big.splits["train"].shards) == 1
    assert load_vocab(tmp_path / "big") == load_vocab(out)
    for split in SPLITS:
        assert read_stream(big, split).tolist() == read_stream(m, split).tolist()
        assert big.splits[split].stats == m.splits[split].stats


def test_layouts_line_endings_and_the_pipeline_script(ray_session, tmp_path):
    # {split}.txt names, CRLF line ends, no final newline: same tokens as the reference
    src = write_wikitext(tmp_path / "src", layout="txt", newline="\r\n", last_newline=False)
    ref = reference(src)
    spec = importlib.util.spec_from_file_location(
        "preprocess_wikitext_script", ROOT / "pipelines" / "preprocess_wikitext.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # URIs (file:// here; s3://, gs:// alike) go through pyarrow's filesystems
    out = f"file://{tmp_path}/out"
    argv = ["--src", f"file://{src}", "--out", out, "--chunk-mb", "0.0001", "--quiet"]
    assert script.main(argv) == 0
    m = load_manifest(out)
    assert m.root == out and m.source == f"file://{src}"
    for split in SPLITS:
        assert read_stream(m, split).tolist() == ref["ids"][split]
        assert m.splits[split].stats["lines"] == ref["lines"][split]


def test_rerun_reuses_overwrite_redoes_and_interrupted_runs_are_cleaned(corpus, tmp_path):
    src, _, _ = corpus
    out = tmp_path / "out"
    # leftovers of an interrupted run: shards and a vocabulary, no manifest
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-00099-000.parquet").write_bytes(b"stale")
    (out / "train" / ".tmp-1234-shard-00000-000.parquet").write_bytes(b"half")
    (out / "vocab.txt").write_text("stale\t1\n")
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(out)
    first = preprocess_wikitext(str(src), str(out), **TINY)
    assert not (out / "train" / "shard-00099-000.parquet").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert load_vocab(out) == reference(src)["vocab"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}

    again = preprocess_wikitext(str(src), str(out), **TINY)  # reused: nothing rewritten
    assert again.splits == first.splits and again.created == first.created
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == stamps
    with pytest.raises(DataError, match="made differently.*shard_tokens.*--overwrite"):
        preprocess_wikitext(str(src), str(out), **{**TINY, "shard_tokens": 1000})

    redone = preprocess_wikitext(
        str(src), str(out), **{**TINY, "shard_tokens": 1000}, overwrite=True
    )
    assert len(redone.splits["train"].shards) < len(first.splits["train"].shards)
    assert redone.splits["train"].stats == first.splits["train"].stats
    load_manifest(out, verify="checksum")


def test_missing_and_empty_split_files(tmp_path):
    src = write_wikitext(tmp_path / "src")
    (src / "wiki.valid.tokens").unlink()
    with pytest.raises(DataError, match=r"missing the valid split \(looked for wiki.valid.tokens"):
        preprocess_wikitext(str(src), str(tmp_path / "out"), progress=False)
    (src / "wiki.valid.tokens").write_bytes(b"")
    with pytest.raises(DataError, match=r"wiki.valid.tokens: empty file"):
        preprocess_wikitext(str(src), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="no such directory"):
        preprocess_wikitext(str(tmp_path / "nowhere"), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="--src"):
        preprocess("wikitext-103", None, str(tmp_path / "out"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a deqray data set"):
        preprocess_wikitext(str(write_wikitext(tmp_path / "ok")), str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_non_utf8_text_is_named_by_file_byte_and_line_and_loses_nothing(corpus, tmp_path):
    _, out, m = corpus
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    src = write_wikitext(tmp_path / "src")
    data = (src / "wiki.valid.tokens").read_bytes()
    at = data.index(b"quokkas")  # line 4, in the file's second tiny chunk
    (src / "wiki.valid.tokens").write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    # even with --overwrite, the finished output survives the bad input
    with pytest.raises(
        DataError, match=rf"wiki.valid.tokens: not UTF-8 text at byte {at} \(line 4\)"
    ):
        preprocess_wikitext(str(src), str(out), name="wikitext-2", overwrite=True, **TINY)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert load_manifest(out, verify="checksum").splits == m.splits


def test_damaged_shards_are_detected_when_read(corpus, tmp_path):
    import shutil

    _, out, _ = corpus
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = load_manifest(copy)
    victim = copy / m.splits["valid"].shards[0].path
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=rf"{victim.name}: \d+ bytes, the manifest says"):
        load_manifest(copy)
    with pytest.raises(DataError, match="damaged; pass --overwrite"):
        preprocess_wikitext(str(corpus[0]), str(copy), **TINY)
    from deqray.data.lm import LMDataConfig

    with pytest.raises(DataError, match=victim.name):
        LMDataConfig(str(copy), batch_size=2)
    # same size, one bit changed in the data: only the checksum notices
    victim.write_bytes(data[:8] + bytes([data[8] ^ 1]) + data[9:])
    load_manifest(copy, verify="size")
    with pytest.raises(DataError, match=rf"{victim.name}: checksum does not match"):
        load_manifest(copy, verify="checksum")
    with pytest.raises(DataError, match="checksum does not match"):
        LMDataConfig(str(copy), batch_size=2, verify="checksum")
    assert os.path.exists(victim)
