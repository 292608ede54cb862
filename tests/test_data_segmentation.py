"""Segmentation data: the joint augmentation against a colour oracle, the embedded shapes
set, and the Ray readers on it.

The oracle: an image painted in blocks of pure red, green and blue whose mask
is the colour's channel. After any transform, a pixel whose colour is still
within TOL of a palette colour must carry that colour's class; a pixel of
class k must have some of channel k; and padding (black, never in the
source) must be exactly the pixels labelled 255. Bilinear resizing blends
colours at block edges, but the nearest source pixel (the mask's
nearest-neighbour sample) has a weight of at least 0.375^2 = 0.14 in the
blend at scales >= 0.5 (antialiased) and 0.25 when enlarging: a blend within
TOL of one colour has no other nearest pixel, and the class's own channel is
at least 0.14 x 255 = 35. A mask resized by interpolating class ids (0 and 2
giving 1 at an edge of red and blue) breaks the second rule.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from deqray.data import PREPROCESSORS, DataError, load_manifest, preprocess
from deqray.data.digits import write_digits
from deqray.data.images import ShardReport, decode_rgb, encode_png
from deqray.data.masks import IGNORE, count_pixels, decode_mask
from deqray.data.segmentation import (
    PASS,
    SegmentationTransform,
    segmentation_data_config,
    segmentation_datasets,
)
from deqray.data.shapes import (
    BACKGROUND_MAX,
    BRIGHT_MIN,
    CLASS_COLOURS,
    JITTER,
    SHAPE_CLASSES,
    write_shapes,
)
from deqray.data.vision import vision_datasets

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)  # class k: channel k
TOL = 20  # < 0.14 x 255
OWN = 25  # < 0.14 x 255: the least of its own channel a pixel of class k has
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def oracle(h: int, w: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image of palette blocks and its (H, W) mask: the colour's index."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, len(PALETTE), (-(-h // block), -(-w // block)))
    mask = np.kron(grid, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    return PALETTE[mask], mask


def assert_aligned(img: torch.Tensor, mask: torch.Tensor, exact: bool = False) -> float:
    """Check an augmented (3, H, W) uint8 image against its (H, W) mask; the matched share."""
    x, m = img.numpy().astype(np.int64), mask.numpy()
    assert x.shape[1:] == m.shape
    pad = m == IGNORE
    np.testing.assert_array_equal((x == 0).all(0), pad)  # black is padding, padding is black
    dist = np.abs(x[None] - PALETTE.astype(np.int64)[:, :, None, None]).max(1)  # (K, H, W)
    near = dist <= (0 if exact else TOL)
    for k in range(len(PALETTE)):
        assert (m[near[k]] == k).all(), f"pixels of colour {k} carry other classes"
        assert (x[k][m == k] >= OWN).all(), f"pixels of class {k} without its colour"
    share = near.any(0)[~pad].mean() if (~pad).any() else 1.0
    if exact:
        assert share == 1.0
    return float(share)


def train_transform(**kw) -> SegmentationTransform:
    opts = dict(
        train=True,
        mean=MEAN,
        std=STD,
        crop_size=(40, 40),
        base_size=80,
        scales=(0.5, 1.0, 1.7),
        flip=0.5,
    )
    return SegmentationTransform(**{**opts, **kw})


def wrapped(image: np.ndarray, mask: np.ndarray):
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(
        torch.from_numpy(mask)
    )


# ----------------------------------------------------------------------------- the transform


def test_image_and_mask_stay_aligned_after_every_transform():
    image, mask = oracle(48, 80, 12, seed=0)
    t = train_transform()
    stages = t.stages()
    assert [type(s).__name__ for s in stages] == [
        "RandomChoice",
        "RandomCrop",
        "RandomHorizontalFlip",
    ]
    sizes, flips, padded = set(), set(), 0
    for seed in range(16):
        for stage in stages:
            torch.manual_seed(seed)
            img, msk = stage(*wrapped(image, mask))
            share = assert_aligned(img, msk, exact=stage is not stages[0])
            assert share > 0.6
            if stage is stages[0]:
                sizes.add(tuple(img.shape[1:]))
            if stage is stages[2]:
                flips.add(not np.array_equal(msk.numpy(), mask))
        torch.manual_seed(seed)
        img, msk = t.apply(image, mask, rng_seed=seed)
        assert img.shape == (3, 40, 40) and msk.shape == (40, 40)
        assert assert_aligned(img, msk) > 0.6
        padded += int((msk == IGNORE).any())
    # the long side is 80 x 0.5, 1.0, 1.7; the short side keeps the aspect, rounded down
    assert sizes == {(24, 40), (48, 80), (81, 136)}
    assert flips == {True, False}
    assert padded > 0  # the 24 x 40 images are padded to the 40 x 40 crop


def test_at_scale_one_the_crop_and_flip_are_exact():
    image, mask = oracle(30, 50, 5, seed=1)
    t = train_transform(crop_size=(20, 30), base_size=50, scales=(1.0,))
    for seed in range(8):
        img, msk = t.apply(image, mask, rng_seed=seed)
        assert_aligned(img, msk, exact=True)
        # the crop is a window of the mask (or of its mirror image)
        windows = [
            (y, x, f)
            for f in (False, True)
            for y in range(30 - 20 + 1)
            for x in range(50 - 30 + 1)
            if np.array_equal((mask[:, ::-1] if f else mask)[y : y + 20, x : x + 30], msk.numpy())
        ]
        assert windows, "the crop is not a window of the mask"


def test_batches_are_normalised_and_each_row_draws_from_its_own_seed():
    pairs = [oracle(16, 16, 4, seed=s) for s in range(6)]
    batch = {
        "image": np.array([encode_png(i) for i, _ in pairs], dtype=object),
        "mask": np.array([encode_png(m) for _, m in pairs], dtype=object),
        "index": np.arange(10, 16),
        PASS: np.zeros(6, np.int64),
    }
    evaluation = SegmentationTransform(train=False, mean=MEAN, std=STD, with_index=True)
    out = evaluation(batch)
    assert out["image"].dtype == np.float32 and out["image"].shape == (6, 3, 16, 16)
    assert out["mask"].dtype == np.uint8 and out["mask"].shape == (6, 16, 16)
    np.testing.assert_array_equal(out["index"], np.arange(10, 16))
    for k, (image, mask) in enumerate(pairs):
        x = image.astype(np.float32).transpose(2, 0, 1) / 255
        mean, std = (np.array(v, np.float32)[:, None, None] for v in (MEAN, STD))
        np.testing.assert_allclose(out["image"][k], (x - mean) / std, atol=1e-5)
        np.testing.assert_array_equal(out["mask"][k], mask)

    t = train_transform(crop_size=(12, 12), base_size=16, seed=7)
    whole = t(batch)
    assert set(whole) == {"image", "mask"}
    # a row's draws do not depend on the batch it arrives in
    alone = t({k: v[3:4] for k, v in batch.items()})
    np.testing.assert_array_equal(alone["image"][0], whole["image"][3])
    np.testing.assert_array_equal(alone["mask"][0], whole["mask"][3])
    # the next pass draws anew; another seed too
    later = t({**batch, PASS: np.ones(6, np.int64)})
    other = train_transform(crop_size=(12, 12), base_size=16, seed=8)(batch)
    for b in (later, other):
        assert any(not np.array_equal(b["mask"][k], whole["mask"][k]) for k in range(6))
    # padding is black before normalisation, so -mean/std after it, and labelled 255
    pad = whole["mask"] == IGNORE
    assert pad.any()
    expect = -np.array(MEAN, np.float32) / np.array(STD, np.float32)
    np.testing.assert_allclose(
        whole["image"].transpose(0, 2, 3, 1)[pad],
        np.broadcast_to(expect, (int(pad.sum()), 3)),
        atol=1e-5,
    )
    # and the caller's torch generator is untouched
    torch.manual_seed(0)
    want = torch.rand(2)
    torch.manual_seed(0)
    t(batch)
    assert torch.equal(torch.rand(2), want)


def test_evaluation_at_another_resolution_resizes_image_and_mask_alike():
    image, mask = oracle(32, 64, 16, seed=2)
    t = SegmentationTransform(train=False, mean=MEAN, std=STD, eval_size=(16, 32))
    img, msk = t.apply(image, mask, rng_seed=0)
    assert img.shape == (3, 16, 32) and msk.shape == (16, 32)
    assert assert_aligned(img, msk) > 0.6
    native = SegmentationTransform(train=False, mean=MEAN, std=STD)
    img, msk = native.apply(image, mask, rng_seed=0)
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), image)
    np.testing.assert_array_equal(msk.numpy(), mask)


def test_transform_options_are_checked():
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationTransform(train=True, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="base_size"):
        SegmentationTransform(train=True, mean=MEAN, std=STD, crop_size=8, scales=(1.0,))
    with pytest.raises(ValueError, match="flip is a probability"):
        SegmentationTransform(train=True, mean=MEAN, std=STD, crop_size=8, flip=2)
    image, mask = oracle(8, 8, 4, seed=0)
    with pytest.raises(DataError, match="its mask"):
        SegmentationTransform(train=False, mean=MEAN, std=STD).apply(image, mask[:4], 0)


def test_mask_format_is_checked():
    with pytest.raises(ValueError, match="got mode RGB"):
        decode_mask(encode_png(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(ValueError, match="not an image format"):
        decode_mask(b"junk")
    report = ShardReport("train", 0)
    count_pixels(report, np.array([[0, 1], [255, 1]], np.uint8), ["a", "b"])
    assert report.class_counts == {"a": 1, "b": 2, "(ignored)": 1}
    with pytest.raises(ValueError, match="mask holds class 2 of 2"):
        count_pixels(report, np.array([[2]], np.uint8), ["a", "b"])


# ----------------------------------------------------------------------------- the shapes set


def shard_rows(m, split):
    out = []
    for uri in m.shard_uris(split):
        out.extend(pq.read_table(uri).to_pylist())
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "s"
    m = write_shapes(
        None, str(root), train_images=40, test_images=12, shard_mb=0.01, progress=False
    )
    assert len(m.splits["train"].shards) >= 4
    return m


def test_shapes_masks_match_the_painted_colours(shapes):
    m = shapes
    assert m.dataset == "shapes" and m.kind == "segmentation"
    assert m.meta["classes"] == SHAPE_CLASSES and m.meta["image_size"] == [32, 32]
    noise = 4 * m.meta["options"]["noise"]  # 4 sigma
    for split, n in (("train", 40), ("test", 12)):
        got = shard_rows(m, split)
        assert [r["index"] for r in got] == list(range(n))
        counts = np.zeros(256, np.int64)
        for r in got:
            rgb, _ = decode_rgb(r["image"])
            mask = decode_mask(r["mask"])
            counts += np.bincount(mask.reshape(-1), minlength=256)
            pixels = rgb.astype(np.int64)
            # background: every channel below BACKGROUND_MAX (plus the noise)
            assert (pixels[mask == 0] < BACKGROUND_MAX + noise).all()
            for k, colour in CLASS_COLOURS.items():
                off = np.abs(pixels[mask == k] - np.array(colour)).max(initial=0)
                assert off <= JITTER + noise, (split, r["index"], k, off)
        stats = m.splits[split].stats
        assert stats["class_pixels"] == {c: int(counts[i]) for i, c in enumerate(SHAPE_CLASSES)}
        assert stats["ignored_pixels"] == 0 and counts[4:].sum() == 0
        assert min(stats["class_pixels"].values()) > 0
    load_manifest(m.root, verify="checksum")


def test_shapes_are_reproducible_and_options_are_checked(shapes, tmp_path):
    m = shapes
    again = write_shapes(
        None, str(tmp_path / "a"), train_images=40, test_images=12, shard_mb=0.01, progress=False
    )
    assert [s.sha256 for s in again.splits["train"].shards] == [
        s.sha256 for s in m.splits["train"].shards
    ]
    other = write_shapes(
        None, str(tmp_path / "b"), train_images=40, test_images=12, seed=1, progress=False
    )
    assert other.splits["train"].stats["class_pixels"] != m.splits["train"].stats["class_pixels"]
    # reused when asked the same, refused when asked otherwise
    assert (
        write_shapes(
            None, str(tmp_path / "b"), train_images=40, test_images=12, seed=1, progress=False
        ).splits
        == other.splits
    )
    with pytest.raises(DataError, match="made differently.*seed"):
        write_shapes(None, str(tmp_path / "b"), train_images=40, test_images=12, progress=False)
    # without the colour cue, shapes are bright in any colour: only geometry tells them apart
    plain = write_shapes(
        None, str(tmp_path / "c"), train_images=8, test_images=2, colour_cue=False, progress=False
    )
    for r in shard_rows(plain, "train"):
        rgb, _ = decode_rgb(r["image"])
        mask = decode_mask(r["mask"])
        assert (rgb[mask > 0].astype(int) > BRIGHT_MIN - 4 * 8).all()
    for bad, match in (
        ({"size": 4}, "size must be an int >= 8"),
        ({"train_images": 0}, "train_images must be an int >= 1"),
        ({"noise": -1.0}, "noise must be >= 0"),
    ):
        with pytest.raises(DataError, match=match):
            write_shapes(None, str(tmp_path / "d"), progress=False, **bad)
    with pytest.raises(DataError, match="generated; got --src"):
        write_shapes("/somewhere", str(tmp_path / "d"), progress=False)
    assert PREPROCESSORS["shapes"] == "deqray.data.shapes:write_shapes"
    assert (
        preprocess(
            "shapes",
            None,
            str(tmp_path / "b"),
            train_images=40,
            test_images=12,
            seed=1,
            progress=False,
        ).splits
        == other.splits
    )


# ----------------------------------------------------------------------------- Ray readers


def _collect(ds) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{index: (image, mask)} of one pass, in the order the rows arrived."""
    out = {}
    for batch in ds.iter_torch_batches(batch_size=16):
        assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.uint8
        for x, y, i in zip(batch["image"], batch["mask"], batch["index"].tolist(), strict=True):
            out[i] = (x.numpy(), y.numpy())
    return out


def _expected(m, split) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    mean, std = (np.array(m.meta[k], np.float32)[:, None, None] for k in ("mean", "std"))
    out = {}
    for r in shard_rows(m, split):
        rgb, _ = decode_rgb(r["image"])
        x = (rgb.astype(np.float32).transpose(2, 0, 1) / 255 - mean) / std
        out[r["index"]] = (x, decode_mask(r["mask"]))
    return out


def test_reader_evaluation_rows_are_exact_and_training_rows_augmented(ray_session, shapes):
    ds = segmentation_datasets(shapes.root, with_index=True, seed=3)
    assert set(ds) == {"train", "test"}
    want = _expected(shapes, "test")
    got = _collect(ds["test"])
    assert sorted(got) == sorted(want)
    for i, (x, y) in got.items():
        np.testing.assert_allclose(x, want[i][0], atol=1e-5)
        np.testing.assert_array_equal(y, want[i][1])
    train = _collect(ds["train"])
    assert sorted(train) == list(range(40))
    raw = _expected(shapes, "train")
    changed = sum(not np.array_equal(y, raw[i][1]) for i, (_, y) in train.items())
    assert changed > 20  # scaled, cropped, flipped (a few draw scale 1, no flip, no shift)
    for x, y in train.values():
        assert x.shape == (3, 32, 32) and set(np.unique(y)) <= {0, 1, 2, 3, IGNORE}


def test_seeded_augmentation_repeats_and_each_pass_draws_anew(ray_session, shapes):
    first = segmentation_datasets(shapes.root, splits=["train"], with_index=True, seed=11)
    pass1, pass2 = _collect(first["train"]), _collect(first["train"])
    again = _collect(
        segmentation_datasets(shapes.root, splits=["train"], with_index=True, seed=11)["train"]
    )
    for i in range(40):
        np.testing.assert_array_equal(again[i][0], pass1[i][0])
        np.testing.assert_array_equal(again[i][1], pass1[i][1])
    assert sum(not np.array_equal(pass1[i][1], pass2[i][1]) for i in range(40)) > 20


def test_deterministic_mode_reads_in_order_without_augmentation(ray_session, shapes):
    ds = segmentation_datasets(shapes.root, splits=["train"], with_index=True, deterministic=True)
    got = _collect(ds["train"])
    assert list(got) == list(range(40))  # shard order, row order: as written
    want = _expected(shapes, "train")
    for i, (x, y) in got.items():
        np.testing.assert_allclose(x, want[i][0], atol=1e-5)
        np.testing.assert_array_equal(y, want[i][1])
    config = segmentation_data_config(["train", "test"], deterministic=True)
    assert config._datasets_to_split == ["train", "test"]
    assert config._user_execution_options.preserve_order
    assert segmentation_data_config()._user_execution_options is None


def test_readers_refuse_each_others_data(tmp_path, shapes):
    digits = write_digits(None, str(tmp_path / "digits"), progress=False)
    with pytest.raises(DataError, match="a 'vision' data set, not segmentation"):
        segmentation_datasets(digits.root)
    with pytest.raises(DataError, match="a 'segmentation' data set, not images"):
        vision_datasets(shapes.root)
    with pytest.raises(DataError, match="no split 'val'"):
        segmentation_datasets(shapes.root, splits=["val"])
    with pytest.raises(DataError, match="split 'train': flip is a probability"):
        segmentation_datasets(shapes.root, flip=1.5)


def test_png_masks_round_trip_every_class_value():
    values = np.array([[0, 1, 17, 18], [200, 254, 255, 3]], np.uint8)
    data = encode_png(values)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "L"
    np.testing.assert_array_equal(decode_mask(data), values)
