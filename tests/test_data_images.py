"""Image preprocessing: ImageNet class folders, CIFAR-10 pickles and the embedded digits.

Fixtures are generated here: real JPEGs written by PIL (varied sizes, a
greyscale one, a PNG under a .JPEG name as in the real ImageNet, corrupt
files), and CIFAR-10 batches in the original pickle format. Checks are exact:
counts per class, bytes and pixels round-tripped, class indices by sorted name.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deqray.data import DataError, load_manifest, preprocess
from deqray.data.digits import load_digits_uint8, write_digits
from deqray.data.images import CIFAR_SPLITS, preprocess_cifar10, preprocess_imagenet

ROOT = Path(__file__).resolve().parents[1]

# class folders are deliberately not created in sorted order
TRAIN_COUNTS = {"n03": 5, "n01": 4, "n02": 6}
VAL_COUNTS = {"n02": 2, "n01": 1}  # n03 has no validation images


def rows(manifest, split):
    """All rows of a split, shard by shard, as a list of dicts."""
    out = []
    for uri in manifest.shard_uris(split):
        out.extend(pq.read_table(uri).to_pylist())
    return out


def make_imagenet(root: Path, seed: int = 0) -> dict[str, bytes]:
    """ImageNet-style folders of real JPEGs; {"split/class/file": bytes} of the good ones."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS)):
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(24, 90, size=2))
                # smooth gradient plus noise: compresses like a photo, not like static
                base = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
                pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pixels)
                if i == 1:
                    img = img.convert("L")  # greyscale JPEGs exist in ImageNet
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                (folder / f"{cls}_{i}.JPEG").write_bytes(buf.getvalue())
                files[f"{split}/{cls}/{cls}_{i}.JPEG"] = buf.getvalue()
    # ImageNet's one PNG with a .JPEG name: kept as is, counted as PNG
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 77, np.uint8)).save(buf, format="PNG")
    (root / "train" / "n02" / "n02_png.JPEG").write_bytes(buf.getvalue())
    files["train/n02/n02_png.JPEG"] = buf.getvalue()
    # corrupt: not an image at all, and a JPEG cut in half
    (root / "train" / "n01" / "n01_garbage.JPEG").write_bytes(b"this is not a jpeg")
    whole = files["train/n03/n03_0.JPEG"]
    (root / "train" / "n03" / "n03_cut.JPEG").write_bytes(whole[: len(whole) // 2])
    (root / "train" / ".DS_Store").write_bytes(b"finder litter")  # hidden: ignored
    return files


@pytest.fixture(scope="module")
def imagenet(ray_session, tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    files = make_imagenet(base / "src")
    manifest = preprocess_imagenet(
        str(base / "src"), str(base / "out"), shard_mb=0.01, progress=False
    )
    return base, files, manifest


def test_imagenet_counts_bytes_and_labels(imagenet):
    base, files, m = imagenet
    classes = sorted(TRAIN_COUNTS)
    assert m.dataset == "imagenet" and m.kind == "vision"
    assert m.meta["classes"] == classes and m.meta["num_classes"] == 3
    train_counts = dict(TRAIN_COUNTS, n02=TRAIN_COUNTS["n02"] + 1)  # + the PNG
    assert m.splits["train"].stats["class_counts"] == {c: train_counts[c] for c in classes}
    assert m.splits["val"].stats["class_counts"] == {"n01": 1, "n02": 2, "n03": 0}
    assert m.splits["train"].rows == sum(train_counts.values())
    assert m.splits["train"].stats["formats"] == {"JPEG": sum(TRAIN_COUNTS.values()), "PNG": 1}
    assert len(m.splits["train"].shards) > 3  # shard_mb=0.01: several small shards
    skipped = m.splits["train"].stats["skipped"]
    assert [s["file"] for s in skipped] == ["train/n01/n01_garbage.JPEG", "train/n03/n03_cut.JPEG"]
    assert "truncated" in skipped[1]["error"]

    for split in ("train", "val"):
        got = rows(m, split)
        assert len(got) == m.splits[split].rows
        for r in got:
            assert r["image"] == files[r["source"]]  # the file's bytes, not re-encoded
            assert r["class_name"] == r["source"].split("/")[1]
            assert r["label"] == classes.index(r["class_name"])
            with Image.open(io.BytesIO(r["image"])) as img:
                assert (r["width"], r["height"]) == img.size
        indices = [r["index"] for r in got]
        assert len(set(indices)) == len(indices)
    # the training split is shuffled before sharding; validation keeps sorted order
    val_sources = [r["source"] for r in rows(m, "val")]
    assert val_sources == sorted(val_sources)
    train_sources = [r["source"] for r in rows(m, "train")]
    assert train_sources != sorted(train_sources)
    load_manifest(m.root, verify="checksum")


def test_imagenet_mean_std_are_those_of_the_training_pixels(imagenet):
    _, files, m = imagenet
    pixels = []
    for name, data in files.items():
        if name.startswith("train/"):
            with Image.open(io.BytesIO(data)) as img:
                # images under 128 px a side are not subsampled: the figures are exact
                pixels.append(np.asarray(img.convert("RGB")).reshape(-1, 3) / 255)
    pixels = np.concatenate(pixels)
    np.testing.assert_allclose(m.meta["mean"], pixels.mean(0), atol=2e-6)
    np.testing.assert_allclose(m.meta["std"], pixels.std(0), atol=2e-6)


def test_imagenet_rerun_reuses_and_overwrite_is_deterministic(imagenet, tmp_path, capsys):
    base, _, m = imagenet
    shard = Path(m.root) / m.splits["train"].shards[0].path
    before = shard.stat().st_mtime_ns
    # reused without looking at the source: even one that has gone away since
    os.rename(base / "src", base / "src-away")
    try:
        again = preprocess_imagenet(str(base / "src"), m.root, shard_mb=0.01, progress=True)
    finally:
        os.rename(base / "src-away", base / "src")
    assert again.splits == m.splits and shard.stat().st_mtime_ns == before
    assert "reusing it" in capsys.readouterr().err

    out = tmp_path / "copy"
    shutil.copytree(m.root, out)
    redone = preprocess_imagenet(
        str(base / "src"), str(out), shard_mb=0.01, overwrite=True, progress=True
    )
    err = capsys.readouterr().err
    assert "shards written" in err and "MB/s" in err  # progress is shown
    # same source, same seed: the same shards, byte for byte
    assert [s.sha256 for s in redone.splits["train"].shards] == [
        s.sha256 for s in m.splits["train"].shards
    ]
    with pytest.raises(DataError, match="holds the 'imagenet' data set, not 'cifar10'"):
        preprocess_cifar10(str(tmp_path), str(out), progress=False)


def test_imagenet_rerun_with_another_source_or_options_is_refused(imagenet, tmp_path):
    """The old shards must not answer for another --src or other options (issue 14)."""
    base, _, m = imagenet
    assert m.source == str(base / "src")
    assert m.meta["options"] == {
        "shard_mb": 0.01,
        "splits": ["train", "val"],
        "seed": 0,
        "strict": False,
    }
    before = {p: p.stat().st_mtime_ns for p in Path(m.root).rglob("*")}
    other = tmp_path / "other"
    shutil.copytree(base / "src", other)
    there, asked = re.escape(str(base / "src")), re.escape(str(other))
    with pytest.raises(DataError, match=rf"source: '{there}' there, '{asked}' asked"):
        preprocess_imagenet(str(other), m.root, shard_mb=0.01, progress=False)
    with pytest.raises(
        DataError, match=r"options\.shard_mb: 0\.01 there, 0\.02 asked.*--overwrite"
    ):
        preprocess_imagenet(str(base / "src"), m.root, shard_mb=0.02, progress=False)
    with pytest.raises(DataError, match=r"options\.seed: 0 there, 1 asked"):
        preprocess_imagenet(str(base / "src"), m.root, shard_mb=0.01, seed=1, progress=False)
    with pytest.raises(DataError, match=r"options\.splits: \['train', 'val'\] there, \['train'\]"):
        preprocess_imagenet(str(base / "src"), m.root, shard_mb=0.01, splits="train")
    # refusals touch nothing; the same --src with a trailing "/" is the same source
    assert {p: p.stat().st_mtime_ns for p in Path(m.root).rglob("*")} == before
    again = preprocess_imagenet(f"{base}/src/", m.root, shard_mb=0.01, progress=False)
    assert again.splits == m.splits
    # --overwrite redoes it from the other source
    out = tmp_path / "copy"
    shutil.copytree(m.root, out)
    (other / "val" / "n01" / "n01_0.JPEG").unlink()
    redone = preprocess_imagenet(str(other), str(out), shard_mb=0.01, overwrite=True)
    assert redone.source == str(other) and redone.splits["val"].rows == m.splits["val"].rows - 1


def test_imagenet_strict_names_the_bad_image_and_writes_no_manifest(imagenet, tmp_path):
    base, _, _ = imagenet
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"n01_garbage\.JPEG: cannot decode image|n03_cut\.JPEG"):
        preprocess_imagenet(str(base / "src"), str(out), strict=True, progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(out)


def test_failed_overwrite_keeps_the_previous_output(imagenet, tmp_path):
    """--overwrite --strict meeting a bad image half way: the old output survives, complete."""
    base, _, m = imagenet
    out = tmp_path / "copy"
    shutil.copytree(m.root, out)
    with pytest.raises(DataError, match=r"n01_garbage\.JPEG|n03_cut\.JPEG"):
        preprocess_imagenet(
            str(base / "src"), str(out), overwrite=True, strict=True, shard_mb=0.01, progress=False
        )
    kept = load_manifest(out, verify="checksum")
    assert kept.splits == m.splits
    # the failed run's staging directory is a leftover that the next run removes
    assert any(p.name.startswith(".tmp-stage-") for p in out.iterdir())
    redone = preprocess_imagenet(str(base / "src"), str(out), overwrite=True, progress=False)
    assert redone.splits["train"].rows == m.splits["train"].rows
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    load_manifest(out, verify="checksum")


def test_interrupted_run_is_cleaned_up(imagenet, tmp_path):
    base, _, _ = imagenet
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    # what a killed run leaves: a finished shard of its own plan, a half-written one
    (out / "train" / "shard-00042.parquet").write_bytes(b"stale")
    (out / "train" / ".tmp-123-shard-00043.parquet").write_bytes(b"half")
    m = preprocess_imagenet(str(base / "src"), str(out), progress=False)
    assert not (out / "train" / "shard-00042.parquet").exists()
    assert not list(out.rglob(".tmp-*"))
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        Path(s.path).name for s in m.splits["train"].shards
    )


def test_imagenet_bad_sources_fail_before_touching_the_output(imagenet, tmp_path):
    base, _, m = imagenet
    src = tmp_path / "src"
    shutil.copytree(base / "src", src)
    (src / "val" / "n99").mkdir()
    (src / "val" / "n99" / "x.JPEG").write_bytes(b"")
    # a finished output, and --overwrite: still nothing of it may be lost
    out = tmp_path / "out"
    shutil.copytree(m.root, out)
    with pytest.raises(DataError, match=r"val/n99: class folder in 'val' is not in 'train'"):
        preprocess_imagenet(str(src), str(out), overwrite=True, progress=False)
    load_manifest(out, verify="checksum")

    shutil.rmtree(src / "val")
    with pytest.raises(DataError, match=r"/val: missing split folder"):
        preprocess_imagenet(str(src), str(tmp_path / "o2"), progress=False)
    (src / "val").mkdir()
    (src / "val" / "loose.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match=r"files outside class folders \(loose.JPEG\)"):
        preprocess_imagenet(str(src), str(tmp_path / "o3"), progress=False)
    with pytest.raises(DataError, match="not a directory"):
        preprocess_imagenet(str(tmp_path / "nowhere"), str(tmp_path / "o4"), progress=False)
    empty = tmp_path / "empty"
    (empty / "train" / "n01").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        preprocess_imagenet(str(empty), str(tmp_path / "o5"), splits="train", progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_sources_and_outputs_as_uris(imagenet, tmp_path):
    # file:// goes through pyarrow's URI resolution, the path s3:// and gs:// take
    base, _, m = imagenet
    uri = f"file://{tmp_path}/out"
    got = preprocess_imagenet(f"file://{base}/src", uri, splits="train", progress=False)
    assert got.root == uri and got.shard_uris("train")[0].startswith(f"{uri}/train/shard-")
    assert got.splits["train"].stats == m.splits["train"].stats
    assert len(rows(got, "train")) == m.splits["train"].rows
    assert load_manifest(uri, verify="checksum").splits == got.splits


# ----------------------------------------------------------------------------- CIFAR-10

# not in sorted order, so the remapping to sorted class indices is visible
LABEL_NAMES = ["truck", "cat", "airplane", "dog"]


def write_cifar(root: Path, rows_per_file: dict[str, int], seed: int = 0) -> dict:
    """CIFAR-10 python batches in the original format; returns {file: (images HWC, labels)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    meta = {b"label_names": [n.encode() for n in LABEL_NAMES], b"num_cases_per_batch": 10}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    arrays = {}
    for name, n in rows_per_file.items():
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, len(LABEL_NAMES), size=n).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            # each row: the red plane, then green, then blue, each 32x32 row-major
            b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        arrays[name] = (images, labels)
    return arrays


CIFAR_ROWS = {"data_batch_1": 9, "data_batch_2": 3, "data_batch_3": 1, "data_batch_4": 0}
CIFAR_ROWS |= {"data_batch_5": 5, "test_batch": 4}


def test_cifar_round_trip_and_sorted_labels(ray_session, tmp_path):
    arrays = write_cifar(tmp_path / "src", CIFAR_ROWS)
    # 4 images a shard (3,072 bytes each)
    m = preprocess_cifar10(
        str(tmp_path / "src"), str(tmp_path / "out"), shard_mb=4 * 3072 / 2**20, progress=False
    )
    classes = sorted(LABEL_NAMES)
    assert m.meta["classes"] == classes and m.meta["source_label_names"] == LABEL_NAMES
    assert m.meta["image_size"] == [32, 32]
    for split, files in CIFAR_SPLITS.items():
        got = rows(m, split)
        expect = [(f, i) for f in files for i in range(CIFAR_ROWS[f])]
        assert [r["source"] for r in got] == [f"{f}[{i}]" for f, i in expect]
        assert [r["index"] for r in got] == list(range(len(expect)))
        counts = dict.fromkeys(classes, 0)
        for r, (f, i) in zip(got, expect, strict=True):
            images, labels = arrays[f]
            name = LABEL_NAMES[labels[i]]
            assert (r["class_name"], r["label"]) == (name, classes.index(name))
            with Image.open(io.BytesIO(r["image"])) as img:
                assert img.format == "PNG"
                np.testing.assert_array_equal(np.asarray(img), images[i])
            counts[name] += 1
        assert m.splits[split].stats["class_counts"] == counts
    # shards of at most 4 rows that never straddle two batch files: 9 -> 3+3+3, 3, 1, 5 -> 2+3
    assert [s.rows for s in m.splits["train"].shards] == [3, 3, 3, 3, 1, 2, 3]
    assert [s.rows for s in m.splits["test"].shards] == [4]
    train = np.concatenate([arrays[f][0] for f in CIFAR_SPLITS["train"]]).reshape(-1, 3) / 255
    np.testing.assert_allclose(m.meta["mean"], train.mean(0), atol=2e-6)
    np.testing.assert_allclose(m.meta["std"], train.std(0), atol=2e-6)


def test_cifar_and_digits_reruns_check_source_and_options(ray_session, tmp_path):
    write_cifar(tmp_path / "src", CIFAR_ROWS)
    write_cifar(tmp_path / "src2", CIFAR_ROWS, seed=1)  # other pixels, same layout
    out = str(tmp_path / "out")
    first = preprocess_cifar10(str(tmp_path / "src"), out, progress=False)
    assert first.meta["options"] == {"shard_mb": 8.0}
    assert preprocess_cifar10(str(tmp_path / "src"), out, shard_mb=8).splits == first.splits
    assert preprocess_cifar10(None, out, progress=False).splits == first.splits  # no --src: any
    with pytest.raises(DataError, match=r"source: .*/src' there, .*/src2' asked"):
        preprocess_cifar10(str(tmp_path / "src2"), out, progress=False)
    with pytest.raises(DataError, match=r"options\.shard_mb: 8\.0 there, 0\.01 asked"):
        preprocess_cifar10(str(tmp_path / "src"), out, shard_mb=0.01, progress=False)
    redone = preprocess_cifar10(str(tmp_path / "src2"), out, overwrite=True, progress=False)
    assert redone.source == str(tmp_path / "src2") and redone.meta["mean"] != first.meta["mean"]

    digits = str(tmp_path / "digits")
    d = write_digits(None, digits, progress=False)
    assert d.meta["options"] == {"test_fraction": 0.2, "seed": 0, "shard_mb": 1.0}
    with pytest.raises(DataError, match=r"options\.test_fraction: 0\.2 there, 0\.3 asked"):
        write_digits(None, digits, test_fraction=0.3, progress=False)
    with pytest.raises(DataError, match=r"options\.seed: 0 there, 5 asked"):
        write_digits(None, digits, seed=5, progress=False)
    assert write_digits(None, digits, seed=5, overwrite=True).meta["split_seed"] == 5


def test_cifar_bad_inputs_are_named(ray_session, tmp_path):
    src = tmp_path / "src"
    write_cifar(src, CIFAR_ROWS)
    os.remove(src / "test_batch")
    with pytest.raises(DataError, match=r"missing CIFAR-10 file\(s\) test_batch"):
        preprocess_cifar10(str(src), str(tmp_path / "out"), progress=False)

    write_cifar(src, CIFAR_ROWS)
    bad = pickle.loads((src / "data_batch_2").read_bytes())
    bad[b"data"] = bad[b"data"][:, :100]
    (src / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"data_batch_2: 'data' is uint8 \(3, 100\)"):
        preprocess_cifar10(str(src), str(out), progress=False)
    assert not out.exists()  # the check pass runs before anything is written

    write_cifar(src, CIFAR_ROWS)
    bad = pickle.loads((src / "data_batch_3").read_bytes())
    bad[b"labels"] = [len(LABEL_NAMES)]
    (src / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: labels outside 0..3"):
        preprocess_cifar10(str(src), str(out), progress=False)

    # a pickle that would run code when loaded is refused, not run
    write_cifar(src, CIFAR_ROWS)
    marker = tmp_path / "pwned"
    (src / "batches.meta").write_bytes(pickle.dumps(RunsCode(f"touch {marker}")))
    with pytest.raises(DataError, match=r"batches.meta: not a CIFAR-10 python pickle"):
        preprocess_cifar10(str(src), str(out), progress=False)
    assert not marker.exists()


class RunsCode:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ----------------------------------------------------------------------------- digits


def test_digits_embedded_set(tmp_path):
    images, labels = load_digits_uint8()
    m = preprocess("digits", None, str(tmp_path / "d"), progress=False)  # via the registry
    assert m.meta["classes"] == [str(d) for d in range(10)]
    assert m.splits["train"].rows + m.splits["test"].rows == len(labels) == 1797
    for split in ("train", "test"):
        counts = m.splits[split].stats["class_counts"]
        for d in range(10):  # stratified: every class split 80/20
            total = int((labels == d).sum())
            share = counts[str(d)] / total
            assert (0.75 < share < 0.85) if split == "train" else (0.15 < share < 0.25)
        for r in rows(m, split):
            i = int(r["source"].split("[")[1].rstrip("]"))
            assert r["label"] == labels[i] and r["class_name"] == str(labels[i])
            with Image.open(io.BytesIO(r["image"])) as img:
                np.testing.assert_array_equal(np.asarray(img), images[i])
    # a fixed split: written again elsewhere, the same bytes
    again = write_digits(None, str(tmp_path / "d2"), progress=False)
    assert [s.sha256 for s in again.splits["test"].shards] == [
        s.sha256 for s in m.splits["test"].shards
    ]
    small = write_digits(None, str(tmp_path / "d3"), shard_mb=0.02, progress=False)
    assert len(small.splits["train"].shards) > 1
    with pytest.raises(DataError, match="bundled with scikit-learn"):
        write_digits("somewhere", str(tmp_path / "d4"))


# ----------------------------------------------------------------------------- entry points


def load_pipeline(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_entry_points(ray_session, tmp_path, capsys):
    # Ray is already up in this process, so connect() joins it
    write_cifar(tmp_path / "src", CIFAR_ROWS)
    cifar = load_pipeline("preprocess_cifar10")
    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "c"), "--quiet"]
    assert cifar.main(argv) == 0
    assert f"manifest: {tmp_path / 'c'}/manifest.json" in capsys.readouterr().out
    imagenet = load_pipeline("preprocess_imagenet")
    assert imagenet.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "i")]) == 1
    assert "missing split folder" in capsys.readouterr().err
