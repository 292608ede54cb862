"""Cityscapes preprocessing on generated trees in the official layout.

The tree is written here: RGB PNG images under leftImg8bit/, labelIds PNGs
(every official label id present) under gtFine/, with the other gtFine files
beside them. The mapping is checked pixel by pixel against cityscapesscripts'
table read another way (its id2label dict) and against a few ids checked by
hand; each bad input is named, skipped or (strict) fatal.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cityscapesscripts.helpers.labels import id2label, trainId2label
from PIL import Image

from deqray.data import PREPROCESSORS, DataError, load_manifest, preprocess
from deqray.data.cityscapes import label_table, preprocess_cityscapes
from deqray.data.masks import IGNORE, decode_mask

H, W = 12, 20
CITIES = {"train": {"aachen": 3, "bochum": 2}, "val": {"frankfurt": 2}}
KNOWN_IDS = sorted(i for i in id2label if 0 <= i < 256)  # 0..33


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def stem(city: str, i: int) -> str:
    return f"{city}_{i:06d}_000019"


def make_tree(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"<split>/<city>/<name>_leftImg8bit.png": (rgb, label ids)} of a generated tree."""
    rng = np.random.default_rng(seed)
    made = {}
    first = True
    for split, cities in CITIES.items():
        for city, n in cities.items():
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True)
            gt_dir.mkdir(parents=True)
            for i in range(n):
                rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                ids = rng.choice(KNOWN_IDS, size=(H, W)).astype(np.uint8)
                if first:  # every official id at least once
                    ids.reshape(-1)[: len(KNOWN_IDS)] = KNOWN_IDS
                    first = False
                name = stem(city, i)
                (img_dir / f"{name}_leftImg8bit.png").write_bytes(png(rgb))
                (gt_dir / f"{name}_gtFine_labelIds.png").write_bytes(png(ids))
                # the rest of a gtFine folder, which the preprocessor must leave alone
                (gt_dir / f"{name}_gtFine_color.png").write_bytes(png(rgb))
                (gt_dir / f"{name}_gtFine_instanceIds.png").write_bytes(png(ids))
                (gt_dir / f"{name}_gtFine_polygons.json").write_text("{}")
                made[f"{split}/{city}/{name}_leftImg8bit.png"] = (rgb, ids)
    (root / "leftImg8bit" / "train" / ".DS_Store").write_bytes(b"finder litter")
    return made


def official_train_ids(ids: np.ndarray) -> np.ndarray:
    """The table's trainId of every pixel, 255 for the classes not evaluated."""

    def train_id(i):
        t = id2label[int(i)].trainId
        return t if 0 <= t < 255 else IGNORE

    return np.vectorize(train_id)(ids).astype(np.uint8)


def rows(manifest, split):
    out = []
    for uri in manifest.shard_uris(split):
        out.extend(pq.read_table(uri).to_pylist())
    return out


@pytest.fixture(scope="module")
def cityscapes(ray_session, tmp_path_factory):
    base = tmp_path_factory.mktemp("cityscapes")
    made = make_tree(base / "src")
    m = preprocess_cityscapes(str(base / "src"), str(base / "out"), shard_mb=0.002, progress=False)
    return base, made, m


def test_label_table_is_the_official_one():
    classes, lut = label_table()
    assert classes == [trainId2label[t].name for t in range(19)]
    # by hand, from the Cityscapes label definitions
    assert (classes[0], classes[10], classes[11], classes[18]) == (
        "road",
        "sky",
        "person",
        "bicycle",
    )
    assert (lut[7], lut[23], lut[24], lut[33]) == (0, 10, 11, 18)
    assert lut[0] == lut[9] == lut[10] == lut[30] == IGNORE  # unlabeled, parking, rail, trailer
    assert lut[34] == lut[255] == -1  # not in the table


def test_ids_become_train_ids_and_pixels_are_counted(cityscapes):
    _, made, m = cityscapes
    classes, _ = label_table()
    assert m.dataset == "cityscapes" and m.kind == "segmentation"
    assert m.meta["classes"] == classes and m.meta["num_classes"] == 19
    assert m.meta["ignore_index"] == IGNORE and m.meta["image_size"] == [H, W]
    assert m.meta["augment"]["crop_size"] == [512, 1024] and m.meta["augment"]["base_size"] == 2048
    assert len(m.splits["train"].shards) > 1
    for split in CITIES:
        got = rows(m, split)
        assert len(got) == m.splits[split].rows == sum(CITIES[split].values())
        expect = np.zeros(256, np.int64)
        for r in got:
            rgb, ids = made[r["source"]]
            assert r["image"] == png(rgb)  # the file's bytes, as they were
            mask = decode_mask(r["mask"])
            np.testing.assert_array_equal(mask, official_train_ids(ids))
            assert (r["height"], r["width"]) == (H, W)
            expect += np.bincount(mask.reshape(-1), minlength=256)
        stats = m.splits[split].stats
        assert stats["class_pixels"] == {c: int(expect[i]) for i, c in enumerate(classes)}
        assert stats["ignored_pixels"] == int(expect[IGNORE])
        assert stats["skipped"] == [] and stats["formats"] == {"PNG": len(got)}
        assert sorted(r["index"] for r in got) == list(range(len(got)))
    # every class appears in train: the first image holds every id
    assert min(m.splits["train"].stats["class_pixels"].values()) > 0
    train = [np.asarray(made[r["source"]][0]) for r in rows(m, "train")]
    pixels = np.concatenate([t.reshape(-1, 3) for t in train]) / 255
    np.testing.assert_allclose(m.meta["mean"], pixels.mean(0), atol=2e-6)
    np.testing.assert_allclose(m.meta["std"], pixels.std(0), atol=2e-6)
    load_manifest(m.root, verify="checksum")


def _bad_tree(root: Path) -> dict[str, str]:
    """A tree with one of each bad input; {image file: what its error must say}."""
    make_tree(root)
    gt = root / "gtFine" / "train"
    img = root / "leftImg8bit" / "train"
    (gt / "aachen" / f"{stem('aachen', 0)}_gtFine_labelIds.png").unlink()
    (gt / "aachen" / f"{stem('aachen', 1)}_gtFine_labelIds.png").write_bytes(
        png(np.full((H + 1, W), 7, np.uint8))
    )
    unknown = np.full((H, W), 7, np.uint8)
    unknown[3, 4], unknown[5, 5] = 34, 200
    (gt / "aachen" / f"{stem('aachen', 2)}_gtFine_labelIds.png").write_bytes(png(unknown))
    (img / "bochum" / f"{stem('bochum', 0)}_leftImg8bit.png").write_bytes(b"not a png")
    (gt / "bochum" / f"{stem('bochum', 1)}_gtFine_labelIds.png").write_bytes(
        png(np.full((H, W, 3), 7, np.uint8))
    )
    return {
        f"leftImg8bit/train/aachen/{stem('aachen', 0)}_leftImg8bit.png": (
            f"no label file gtFine/train/aachen/{stem('aachen', 0)}_gtFine_labelIds.png"
        ),
        f"leftImg8bit/train/aachen/{stem('aachen', 1)}_leftImg8bit.png": (
            f"bad label gtFine/train/aachen/{stem('aachen', 1)}_gtFine_labelIds.png: "
            f"ValueError: label is {W}x{H + 1}, the image {W}x{H}"
        ),
        f"leftImg8bit/train/aachen/{stem('aachen', 2)}_leftImg8bit.png": (
            "unknown label ids 34, 200"
        ),
        f"leftImg8bit/train/bochum/{stem('bochum', 0)}_leftImg8bit.png": (
            f"cannot decode image leftImg8bit/train/bochum/{stem('bochum', 0)}_leftImg8bit.png"
        ),
        f"leftImg8bit/train/bochum/{stem('bochum', 1)}_leftImg8bit.png": (
            "label ids are one channel, got a mode RGB image"
        ),
    }


def test_bad_inputs_are_skipped_and_named(ray_session, tmp_path):
    bad = _bad_tree(tmp_path / "src")
    m = preprocess_cityscapes(str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    skipped = m.splits["train"].stats["skipped"]
    assert [s["file"] for s in skipped] == sorted(bad)
    for s in skipped:
        assert bad[s["file"]] in s["error"], s
    assert m.splits["train"].rows == 0  # all five training images were bad
    assert m.splits["train"].shards == []
    assert m.splits["val"].rows == 2 and m.splits["val"].stats["skipped"] == []


@pytest.mark.parametrize("which", range(5))
def test_strict_ends_the_run_naming_the_bad_file(ray_session, tmp_path, which):
    bad = _bad_tree(tmp_path / "src")
    keep = sorted(bad)[which]
    # leave only one bad image: the others' folders get good copies back
    make_tree(tmp_path / "good")  # the same seed: the same files, all good
    for image in sorted(bad):
        if image == keep:
            continue
        rel_img = Path(image)
        city, name = rel_img.parts[-2], rel_img.name[: -len("_leftImg8bit.png")]
        label = Path("gtFine/train") / city / f"{name}_gtFine_labelIds.png"
        for rel in (rel_img, label):
            shutil.copy(tmp_path / "good" / rel, tmp_path / "src" / rel)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        preprocess_cityscapes(str(tmp_path / "src"), str(out), strict=True, progress=False)
    text = str(err.value)
    assert str(tmp_path / "src" / keep) in text and bad[keep] in text
    assert not (out / "manifest.json").exists()
    if "no label file" in bad[keep]:  # found while listing: the output is not even created
        assert not out.exists()


def test_rerun_reuses_and_overwrite_is_deterministic(cityscapes, tmp_path, capsys):
    base, _, m = cityscapes
    again = preprocess_cityscapes(str(base / "src"), m.root, shard_mb=0.002, progress=True)
    assert again.splits == m.splits and "reusing it" in capsys.readouterr().err
    # reused without the source, but never for other options
    assert preprocess_cityscapes(None, m.root, shard_mb=0.002, progress=False).splits == m.splits
    with pytest.raises(DataError, match="made differently.*splits"):
        preprocess_cityscapes(None, m.root, shard_mb=0.002, splits="train", progress=False)
    out = tmp_path / "copy"
    shutil.copytree(m.root, out)
    redone = preprocess_cityscapes(
        str(base / "src"), str(out), shard_mb=0.002, overwrite=True, progress=False
    )
    assert [s.sha256 for s in redone.splits["train"].shards] == [
        s.sha256 for s in m.splits["train"].shards
    ]
    # a failed --overwrite --strict loses nothing
    src = tmp_path / "src"
    shutil.copytree(base / "src", src)
    frankfurt = src / "leftImg8bit" / "val" / "frankfurt"
    (frankfurt / f"{stem('frankfurt', 0)}_leftImg8bit.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode image"):
        preprocess_cityscapes(
            str(src), str(out), shard_mb=0.002, overwrite=True, strict=True, progress=False
        )
    assert load_manifest(out, verify="checksum").splits == m.splits


def test_layout_errors_fail_before_touching_the_output(ray_session, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"leftImg8bit/test: missing folder"):
        preprocess_cityscapes(str(src), str(out), splits="train,test", progress=False)
    shutil.rmtree(src / "gtFine" / "val")
    with pytest.raises(DataError, match=r"gtFine/val: missing folder"):
        preprocess_cityscapes(str(src), str(out), progress=False)
    (src / "leftImg8bit" / "train" / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"files that are not <city>/<name>_leftImg8bit.png"):
        preprocess_cityscapes(str(src), str(out), splits="train", progress=False)
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    (empty / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"leftImg8bit/train: no \*_leftImg8bit.png images"):
        preprocess_cityscapes(str(empty), str(out), splits="train", progress=False)
    with pytest.raises(DataError, match="not a directory"):
        preprocess_cityscapes(str(tmp_path / "nowhere"), str(out), progress=False)
    with pytest.raises(DataError, match="--src is required"):
        preprocess_cityscapes(None, str(out), progress=False)
    assert not out.exists()


def test_registered_as_a_preprocessor(cityscapes, tmp_path):
    base, _, m = cityscapes
    assert PREPROCESSORS["cityscapes"] == "deqray.data.cityscapes:preprocess_cityscapes"
    got = preprocess("cityscapes", str(base / "src"), str(tmp_path / "o"), splits="val")
    assert got.splits["val"].stats == m.splits["val"].stats
    with pytest.raises(DataError, match=r"unknown option 'shard_md' \(did you mean 'shard_mb'"):
        preprocess("cityscapes", str(base / "src"), str(tmp_path / "o2"), shard_md=1)
