"""The segmentation reader's uint8 path: actors ship uint8 pixels, the worker normalises.

Rows are seeded per image (seed, pass, index), so the float32 and the uint8
readers of one seed draw the same crops: their batches must be equal after
normalisation, bit for bit, on the augmented training split (the evaluation
transform is the same code with fewer stages).
"""

from __future__ import annotations

import pytest
import torch

from deqray.data.segmentation import segmentation_batches, segmentation_datasets
from deqray.data.shapes import write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "s"
    return write_shapes(
        None, str(root), train_images=24, test_images=8, shard_mb=0.01, progress=False
    )


def _rows(ds) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for b in segmentation_batches(ds, batch_size=5):
        for x, m, i in zip(b["image"], b["mask"], b["index"].tolist(), strict=True):
            out[i] = (x, m)
    return out


def test_uint8_batches_equal_the_float32_batches_after_normalisation(ray_session, shapes):
    got = {
        output: _rows(
            segmentation_datasets(
                shapes.root, splits=["train"], output=output, with_index=True, seed=7
            )["train"]
        )
        for output in ("float32", "uint8")
    }
    assert sorted(got["uint8"]) == sorted(got["float32"]) == list(range(24))
    for i, (x, m) in got["uint8"].items():
        assert x.dtype == torch.float32 and x.shape[0] == 3 and m.dtype == torch.uint8
        assert torch.equal(x, got["float32"][i][0]), i
        assert torch.equal(m, got["float32"][i][1]), i


def test_batches_need_a_segmentation_dataset(ray_session):
    import ray.data

    with pytest.raises(ValueError, match="does not come from segmentation_datasets"):
        next(segmentation_batches(ray.data.from_items([{"image": 0}]), batch_size=1))
    with pytest.raises(ValueError, match="output must be 'float32' or 'uint8'"):
        segmentation_datasets("unused", output="encoded")
