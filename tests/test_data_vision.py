"""Vision readers: decoding and augmentation, Ray Datasets, and a real 2-worker TorchTrainer.

The transform is tested directly (fast, exact) and against torchvision's own
transforms; the Ray paths on the embedded digits, cut into several shards so
that splitting across workers has something to split. The three outputs
(encoded and decoded on the worker, uint8 from actors, float32 from actors)
must give the same batches.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from deqray.data import DataError
from deqray.data.digits import load_digits_uint8, write_digits
from deqray.data.vision import (
    CONTEXT_KEY,
    DecodeTransform,
    Normalize,
    consume_loop,
    vision_batches,
    vision_data_config,
    vision_datasets,
)

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def batch_of(*images: bytes) -> dict:
    return {"image": np.array(images, dtype=object), "label": np.arange(len(images))}


def normalised(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the (3, H, W) float32 the readers should produce."""
    x = pixels.astype(np.float32).transpose(2, 0, 1) / 255
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (MEAN, STD))
    return (x - mean) / std


def test_eval_transform_is_exact_and_deterministic():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    t = DecodeTransform(size=32, train=False, mean=MEAN, std=STD, crop_fraction=1.0)
    # PNG, BMP and a greyscale PNG (which must come out as RGB)
    out = t(batch_of(encode(rgb), encode(rgb, "BMP"), encode(grey)))
    assert out["image"].shape == (3, 3, 32, 32) and out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], [0, 1, 2])
    np.testing.assert_allclose(out["image"][0], normalised(rgb), atol=1e-5)
    np.testing.assert_allclose(out["image"][1], normalised(rgb), atol=1e-5)
    np.testing.assert_allclose(out["image"][2], normalised(np.stack([grey] * 3, -1)), atol=1e-5)
    again = t(batch_of(encode(rgb), encode(rgb, "BMP"), encode(grey)))
    np.testing.assert_array_equal(again["image"], out["image"])


def test_eval_resize_and_center_crop_keep_the_middle():
    # a wide JPEG whose middle third is white, sides black; the 0.5 crop keeps only the middle
    pixels = np.zeros((60, 180, 3), np.uint8)
    pixels[:, 60:120] = 255
    t = DecodeTransform(size=(16, 16), train=False, mean=MEAN, std=STD, crop_fraction=0.5)
    out = t(batch_of(encode(pixels, "JPEG")))["image"][0]
    # resized to 32 x 96, center crop 16 x 16: entirely inside the white band
    np.testing.assert_allclose(out, normalised(np.full((16, 16, 3), 255, np.uint8)), atol=0.05)


def test_train_augmentation_is_random_and_flips():
    side = 24
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[:, : side // 2] = 255  # white left half: a flip is visible
    data = encode(pixels)
    # scale and ratio 1: the crop is the whole image, only the flip is random
    t = DecodeTransform(
        size=side, train=True, mean=MEAN, std=STD, scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    out = t(batch_of(*[data] * 64))["image"]
    plain, mirrored = normalised(pixels), normalised(pixels[:, ::-1])
    is_plain = [np.allclose(x, plain, atol=1e-5) for x in out]
    is_mirrored = [np.allclose(x, mirrored, atol=1e-5) for x in out]
    assert all(a != b for a, b in zip(is_plain, is_mirrored, strict=True))
    assert 10 < sum(is_mirrored) < 54  # p = 0.5 each; this fails with probability ~1e-7

    crops = DecodeTransform(size=16, train=True, mean=MEAN, std=STD)
    photo = encode(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    a, b = crops(batch_of(photo, photo))["image"]
    assert a.shape == (3, 16, 16) and not np.allclose(a, b)
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    assert (a.min(axis=(1, 2)) >= lo - 1e-5).all() and (a.max(axis=(1, 2)) <= hi + 1e-5).all()


def test_each_decode_actor_draws_its_own_random_stream():
    # torch starts every process from the same seed: two actors must still differ,
    # and the caller's generator is neither used nor disturbed
    photo = encode(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a, b = (DecodeTransform(size=16, train=True, mean=MEAN, std=STD) for _ in range(2))
    out_a, out_b = a(batch_of(photo)), b(batch_of(photo))
    assert not np.allclose(out_a["image"], out_b["image"])
    assert torch.equal(torch.rand(3), expected)


def test_normalize_against_numpy_and_the_float_output_bit_for_bit():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    out = Normalize(MEAN, STD)(torch.from_numpy(pixels))
    assert out.shape == (5, 3, 7, 9) and out.dtype == torch.float32
    expect = np.stack([normalised(p) for p in pixels])
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\) uint8 images"):
        Normalize(MEAN, STD)(torch.zeros(2, 3, 4, 4))
    # the uint8 output, normalised afterwards, is the float output exactly
    photo = encode(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "JPEG")
    opts = dict(size=(16, 24), train=False, mean=MEAN, std=STD, crop_fraction=0.875)
    as_uint8 = DecodeTransform(**opts, output="uint8")(batch_of(photo, photo))["image"]
    as_float = DecodeTransform(**opts)(batch_of(photo, photo))["image"]
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (2, 16, 24, 3)
    after = Normalize(MEAN, STD)(torch.from_numpy(as_uint8)).numpy()
    np.testing.assert_array_equal(after, as_float)


def test_eval_geometry_is_torchvisions_resize_and_center_crop():
    from torchvision.transforms import v2

    rng = np.random.default_rng(4)
    cases = [((240, 320), 224, 0.875), ((375, 500), (224, 224), 0.875), ((50, 40), (16, 32), 1.0)]
    for (h, w), size, fraction in cases:
        # smooth, like a photo: upsampled noise
        small = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
        img = small.resize((w, h), Image.BILINEAR)
        t = DecodeTransform(
            size=size, train=False, mean=MEAN, std=STD, crop_fraction=fraction, output="uint8"
        )
        ours = t(batch_of(encode(np.asarray(img))))["image"][0].astype(int)
        reference = v2.Compose([v2.Resize(t.resize, antialias=True), v2.CenterCrop(t.size)])(img)
        # one resampling of the box instead of two steps: fixed-point rounding only
        assert np.abs(ours - np.asarray(reference).astype(int)).max() <= 1, (h, w, size)


def test_random_crops_follow_torchvisions_rule():
    from torchvision.transforms import v2

    t = DecodeTransform(size=16, train=True, mean=MEAN, std=STD)
    t._rng = np.random.default_rng(5)
    ours = np.array([t._random_crop(320, 240) for _ in range(20000)], dtype=float)
    left, top, w, h = ours.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= 320).all() and (top + h <= 240).all()
    drawn = (w * h >= 0.08 * 320 * 240 * 0.99) & (w / h >= 3 / 4 * 0.98) & (w / h <= 4 / 3 * 1.02)
    assert drawn.all()  # on a 4:3 image every window is a draw or the 4:3 whole
    torch.manual_seed(5)
    sampler, img = v2.RandomResizedCrop(16), Image.new("RGB", (320, 240))
    params = [sampler.make_params([img]) for _ in range(20000)]
    theirs = np.array([(p["left"], p["top"], p["width"], p["height"]) for p in params], float)
    # the same distribution: means within a few standard errors (fixed seeds: no flakiness)
    for col in range(4):
        se = np.hypot(ours[:, col].std(), theirs[:, col].std()) / np.sqrt(len(ours))
        assert abs(ours[:, col].mean() - theirs[:, col].mean()) < 4 * se, col
    # a wide image no draw fits: the whole height, the widest allowed aspect, centered
    assert t._random_crop(400, 10) == (193, 0, 13, 10)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    # ~0.02 MB shards: several per split
    root = tmp_path_factory.mktemp("digits") / "d"
    m = write_digits(None, str(root), shard_mb=0.02, progress=False)
    assert len(m.splits["train"].shards) >= 4
    return m


def test_ray_datasets_deliver_decoded_normalised_tensors(ray_session, digits):
    images, _ = load_digits_uint8()
    sources = {}
    for split in ("train", "test"):
        for uri in digits.shard_uris(split):
            t = pq.read_table(uri, columns=["index", "source"]).to_pylist()
            sources[split] = sources.get(split, {}) | {
                r["index"]: int(r["source"].split("[")[1].rstrip("]")) for r in t
            }
    ds = vision_datasets(digits.root, with_index=True, size=None)
    mean, std = digits.meta["mean"], digits.meta["std"]
    seen = []
    for batch in ds["test"].iter_torch_batches(batch_size=100):
        x = batch["image"]
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
        assert batch["label"].dtype == torch.int64 and set(batch) == {"image", "label", "index"}
        for img, index in zip(x.numpy(), batch["index"].tolist(), strict=True):
            grey = images[sources["test"][index]].astype(np.float32) / 255
            expect = (grey[None] - np.array(mean, np.float32)[:, None, None]) / np.array(
                std, np.float32
            )[:, None, None]
            np.testing.assert_allclose(img, expect, atol=1e-5)  # 8 px, crop 1: no resampling
            seen.append(index)
    assert sorted(seen) == sorted(sources["test"])


def _all_batches(ds, **kw):
    out = {"image": [], "label": [], "index": []}
    for b in vision_batches(ds, batch_size=50, **kw):
        for k in out:
            out[k].append(b[k])
    return {k: torch.cat(v) for k, v in out.items()}


def test_the_three_outputs_give_the_same_batches_in_the_read_order(ray_session, digits):
    """Encoded (decoded by the iterator's threads), uint8 and float32 (decoded by actors):
    equal after normalisation, bit for bit, and with preserve_order in the read order,
    which for the threads (4 of them, finishing in any order) is Ray restoring it."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.execution_options
    context.execution_options = copy.deepcopy(saved)
    context.execution_options.preserve_order = True
    try:  # a Dataset keeps the context it was made in
        made = {
            out: vision_datasets(
                digits.root, splits=["test"], output=out, size=12, with_index=True, shuffle=False
            )["test"]
            for out in ("encoded", "uint8", "float32")
        }
    finally:
        context.execution_options = saved
    got = {out: _all_batches(ds) for out, ds in made.items()}
    uris = digits.shard_uris("test")
    read_order = [i for u in uris for i in pq.read_table(u).column("index").to_pylist()]
    for out, b in got.items():
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 12, 12), out
        assert b["index"].tolist() == read_order, out
        assert torch.equal(b["label"], got["float32"]["label"])
        assert torch.equal(b["image"], got["float32"]["image"]), out
    again = _all_batches(made["encoded"])
    assert all(torch.equal(again[k], got["encoded"][k]) for k in again)


def test_encoded_training_split_is_augmented_on_the_worker(ray_session, digits):
    both = vision_datasets(digits.root, output="encoded", size=16)
    # each split carries its own transform (a Dataset shares its context with those made from it)
    assert both["train"].context.get_config(CONTEXT_KEY)["train"] is True
    assert both["test"].limit(5).context.get_config(CONTEXT_KEY)["train"] is False
    ds = both["train"]
    a, b = (torch.cat([x["image"] for x in vision_batches(ds, batch_size=64)]) for _ in range(2))
    assert a.shape == (digits.splits["train"].rows, 3, 16, 16)
    assert not torch.equal(a, b)  # new crops and flips each pass
    import ray.data

    other = ray.data.from_items([{"image": b"", "label": 0}])
    with pytest.raises(ValueError, match="does not come from vision_datasets"):
        next(vision_batches(other, batch_size=1))


def test_reader_refuses_damaged_shards(ray_session, digits, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(digits.root, root)
    shard = root / digits.splits["test"].shards[0].path
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + bytes([data[8] ^ 1]) + data[9:])  # same size, other content
    vision_datasets(str(root), verify="size")  # only the checksum can notice
    with pytest.raises(DataError, match=r"test/shard-00000.parquet: checksum does not match"):
        vision_datasets(str(root), verify="checksum")
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"test/shard-00000.parquet: \d+ bytes, the manifest says"):
        vision_datasets(str(root))
    with pytest.raises(DataError, match="no split 'val'"):
        vision_datasets(digits.root, splits=["val"], verify="none")
    assert Path(digits.root, "manifest.json").exists()


def test_two_workers_on_two_cpus_get_disjoint_covering_shards(ray_clean, digits, tmp_path):
    """A real TorchTrainer: 2 workers of 0.5 CPU, decode actors and reads on the other CPU.

    The workers read the training split (divided), then, after a barrier,
    the test split (whole, on both workers at once: with decode actors of
    0.5 CPU and read tasks of 0.25 this hung, the two evaluation actors
    holding the CPUs their read tasks needed). Digits upscaled to 16 px.
    The actor path ("uint8": actors decode, the workers normalise), which is
    the one that can starve; "encoded" (no actors) trains with 2 workers in
    test_train.py. About 45 s.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    report_dir = tmp_path / "reports"
    trainer = TorchTrainer(
        consume_loop,
        train_loop_config={
            "splits": ["train", "test"],
            "batch_size": 64,
            "epochs": 1,
            "report_dir": str(report_dir),
        },
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=vision_datasets(digits.root, with_index=True, size=16, output="uint8"),
        dataset_config=vision_data_config(),
        run_config=RunConfig(name=f"vision-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path)),
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "TorchTrainer.fit did not finish in 300 s: reading deadlocked?"
    assert outcome["result"].error is None

    ranks = [json.loads((report_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    train_ids = set(range(digits.splits["train"].rows))
    test_ids = set(range(digits.splits["test"].rows))
    got = [set(r["epochs"][0]["train"]["index"]) for r in ranks]
    assert not got[0] & got[1]  # disjoint
    assert got[0] | got[1] == train_ids  # covering
    assert abs(len(got[0]) - len(got[1])) <= 1  # equal split
    for r in ranks:
        epoch = r["epochs"][0]
        assert sorted(epoch["test"]["index"]) == sorted(test_ids)  # validation is not split
        for split in ("train", "test"):
            assert epoch[split]["shapes"] == [[3, 16, 16]]
            assert epoch[split]["dtypes"] == ["torch.float32"]
