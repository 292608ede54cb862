"""One worker's datasets reach it unsplit (deqray.train.driver.unsplit_for_one_worker).

A split of one is the whole dataset, so the same rows in the same order, but it
costs a SplitCoordinator actor per dataset; unsplit, the worker executes the
dataset itself. Checked against Ray's own split, on the session's Ray.
"""

from __future__ import annotations

import pytest

from deqray.data.lm import LMDataConfig
from deqray.train.driver import unsplit_for_one_worker


def test_only_a_plain_config_for_one_worker_loses_its_splits():
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    options = ExecutionOptions(preserve_order=True)
    plain = DataConfig(datasets_to_split=["train", "eval"], execution_options=options)
    one = unsplit_for_one_worker(plain, 1)
    assert one._datasets_to_split == [] and one._user_execution_options is options
    assert plain._datasets_to_split == ["train", "eval"]  # the task's own is left as it was
    assert unsplit_for_one_worker(plain, 2) is plain
    # TorchTrainer's default (None) splits everything
    assert unsplit_for_one_worker(None, 1)._datasets_to_split == []
    assert unsplit_for_one_worker(None, 2) is None

    # a configure of its own (the language model's lanes) decides for itself
    class Own(DataConfig):
        def configure(self, *args, **kwargs):
            return super().configure(*args, **kwargs)

    own = Own(datasets_to_split=["train"])
    assert unsplit_for_one_worker(own, 1) is own and own._datasets_to_split == ["train"]
    assert LMDataConfig.configure is not DataConfig.configure


@pytest.mark.parametrize("preserve_order", [True, False])
def test_unsplit_gives_one_worker_what_its_split_gives(ray_session, preserve_order):
    import ray
    from ray.data import ExecutionOptions
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator
    from ray.train import DataConfig

    def double(batch):
        return {"id": batch["id"], "x": batch["id"] * 2}

    ds = ray.data.range(300, override_num_blocks=6).map_batches(double, batch_size=32)
    options = ExecutionOptions(preserve_order=preserve_order)
    node = [ray.get_runtime_context().get_node_id()]
    split = DataConfig(datasets_to_split=["train"], execution_options=options)
    unsplit = unsplit_for_one_worker(split, 1)
    (a,) = split.configure({"train": ds}, 1, None, node)
    (b,) = unsplit.configure({"train": ds}, 1, None, node)
    assert isinstance(a["train"], StreamSplitDataIterator)
    assert not isinstance(b["train"], StreamSplitDataIterator)

    def epoch(it):
        return [
            (int(i), int(x))
            for r in it.iter_batches(batch_size=50)
            for i, x in zip(r["id"], r["x"], strict=True)
        ]

    for _ in range(2):  # a second epoch executes the dataset again, in both
        rows_a, rows_b = epoch(a["train"]), epoch(b["train"])
        assert sorted(rows_a) == sorted(rows_b) == [(i, 2 * i) for i in range(300)]
        if preserve_order:
            assert rows_a == rows_b
