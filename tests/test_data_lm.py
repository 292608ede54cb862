"""The Markov corpus (entropy in closed form) and the ordered LM readers for Ray Train."""

from __future__ import annotations

import json
import math
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deqray.data import DataError, load_manifest
from deqray.data.lm import (
    LMDataConfig,
    iter_lm_batches,
    lane_layout,
    lm_datasets,
    lm_ingest,
    lm_probe_loop,
    summarize_lm_batches,
)
from deqray.data.markov import (
    MarkovParams,
    load_chain,
    random_chain,
    states_of_tokens,
    write_markov_corpus,
)

SMALL = {"vocab_size": 40, "branching": 6, "tokens": 12_000, "seed": 3}


def batch_means_se(x: np.ndarray, n_batches: int = 50) -> float:
    """Standard error of a correlated sample's mean, from the spread of batch means."""
    m = len(x) // n_batches
    means = x[: m * n_batches].reshape(n_batches, m).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(n_batches))


def read_stream(manifest, split) -> np.ndarray:
    return np.concatenate(
        [pq.read_table(u).column("token").to_numpy() for u in manifest.shard_uris(split)]
    )


@pytest.fixture(scope="module")
def markov(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("markov") / "out"
    text = tmp_path_factory.mktemp("markov") / "text"
    m = write_markov_corpus(str(text), str(out), shard_tokens=700, progress=False, **SMALL)
    return out, text, m


# --------------------------------------------------------------------------- #
# the Markov source
# --------------------------------------------------------------------------- #


def test_entropy_rate_closed_form_matches_a_long_sample():
    chain = random_chain(MarkovParams())  # the quickstart's chain
    P, pi = chain.matrix(), chain.stationary()
    assert np.allclose(P.sum(axis=1), 1) and np.allclose(pi @ P, pi) and (pi > 0).all()
    H = chain.entropy_rate()
    assert H == pytest.approx(-(pi[:, None] * np.where(P > 0, P * np.log(P + (P == 0)), 0)).sum())
    x = chain.sample(300_000, np.random.default_rng(7))
    nll = chain.nll(x)
    se = batch_means_se(nll)
    assert abs(nll.mean() - H) < 5 * se, (nll.mean(), H, se)
    # the plug-in estimate from transition counts agrees too
    prev = np.concatenate([[chain.eos], x[:-1]])
    counts = np.zeros_like(P)
    np.add.at(counts, (prev, x), 1)
    rows = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    plug_in = -(counts[nz] * np.log(counts[nz] / np.broadcast_to(rows, P.shape)[nz])).sum() / len(x)
    assert plug_in == pytest.approx(H, abs=0.02)
    assert (x == chain.eos).mean() == pytest.approx(pi[chain.eos], abs=0.005)


def test_markov_corpus_is_the_chain_token_for_token(markov):
    out, text, m = markov
    chain = load_chain(m)
    H = chain.entropy_rate()
    assert m.meta["entropy_rate_nats"] == pytest.approx(H)
    assert m.meta["best_perplexity"] == pytest.approx(math.exp(H))
    assert m.meta["vocab_size"] == SMALL["vocab_size"] + 2  # the words, <eos>, an unused <unk>
    for split in ("train", "valid", "test"):
        stats = m.splits[split].stats
        assert stats["unknown"] == 0
        ids = read_stream(m, split)
        states = states_of_tokens(m, ids)
        # every <eos> is a line break of the chain, and the files end with one
        assert (states == chain.eos).sum() == stats["lines"] and states[-1] == chain.eos
        assert stats["tokens"] >= SMALL["tokens"] // (1 if split == "train" else 10)
    states = states_of_tokens(m, read_stream(m, "train"))
    nll = chain.nll(states)
    assert abs(nll.mean() - H) < 5 * batch_means_se(nll)
    assert (text / "wiki.train.tokens").read_text().endswith("\n")  # --src keeps the text
    # a second call reuses the output; other parameters are refused without --overwrite
    assert write_markov_corpus(None, str(out), shard_tokens=700, progress=False, **SMALL) == m
    with pytest.raises(DataError, match="made differently"):
        write_markov_corpus(
            None, str(out), shard_tokens=700, progress=False, **{**SMALL, "seed": 4}
        )


# --------------------------------------------------------------------------- #
# lanes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n,w,b", [(2, 1, 1), (100, 2, 3), (1001, 4, 5), (7, 3, 2)])
def test_lane_layout_is_disjoint_and_covers_up_to_the_remainder(n, w, b):
    lay = lane_layout(n, w, b)
    starts = [lay.lane_start(r, i) for r in range(w) for i in range(b)]
    assert starts == [g * lay.lane_len for g in range(w * b)]  # contiguous, rank-major
    covered = w * b * lay.lane_len
    assert covered + 1 <= n and n - 1 - covered < w * b  # targets fit; remainder < lanes


def test_lane_layout_refuses_too_few_tokens():
    with pytest.raises(DataError, match="too few for 4 workers x 3 rows"):
        lane_layout(12, 4, 3)


def _fake_shard(rows):
    """A stand-in for a DataIterator over piece rows (lane, start, tokens)."""

    class Shard:
        def iter_batches(self, **_):
            for lane, start, tokens in rows:
                yield pa.table(
                    {
                        "lane": pa.array([lane], pa.int32()),
                        "lanes": pa.array([2], pa.int32()),
                        "lane_start": pa.array([lane * 10], pa.int64()),
                        "start": pa.array([start], pa.int64()),
                        "lane_stop": pa.array([lane * 10 + 11], pa.int64()),
                        "tokens": pa.array([tokens], pa.list_(pa.int32())),
                    }
                )

    return Shard()


def test_iteration_checks_order_and_shapes_without_ray():
    stream = list(range(100, 121))
    good = [
        (0, 0, stream[0:6]),
        (1, 10, stream[10:16]),
        (0, 6, stream[6:11]),
        (1, 16, stream[16:21]),
    ]
    batches = list(iter_lm_batches(_fake_shard(good), tgt_len=4))
    assert [tuple(b.tokens.shape) for b in batches] == [(2, 4), (2, 4), (2, 2)]
    assert batches[0].tokens.tolist() == [stream[0:4], stream[10:14]]
    assert batches[0].targets.tolist() == [stream[1:5], stream[11:15]]
    assert batches[2].targets.tolist() == [stream[9:11], stream[19:21]]
    assert [b.positions.tolist() for b in batches] == [[0, 10], [4, 14], [8, 18]]
    assert len(list(iter_lm_batches(_fake_shard(good), tgt_len=4, drop_last=True))) == 2
    swapped = [good[0], good[2], good[1], good[3]]  # fine: lanes are independent
    assert len(list(iter_lm_batches(_fake_shard(swapped), tgt_len=4))) == 3
    skipped = [good[0], good[1], good[3]]  # lane 0 never gets its second piece
    with pytest.raises(DataError, match="lanes ended early"):
        list(iter_lm_batches(_fake_shard(skipped), tgt_len=4))
    disorder = [good[2], good[0], good[1], good[3]]
    with pytest.raises(DataError, match="lane 0: expected stream position 0, got 6"):
        list(iter_lm_batches(_fake_shard(disorder), tgt_len=4))

    class Plain:
        def iter_batches(self, **_):
            yield pa.table({"token": [1, 2, 3]})

    with pytest.raises(DataError, match="LMDataConfig"):
        list(iter_lm_batches(Plain(), tgt_len=4))


def test_each_worker_reads_its_own_lanes_in_order(markov):
    out, _, m = markov
    stream = read_stream(m, "train")
    W, B, L = 2, 3, 13
    config = LMDataConfig(str(out), batch_size={"train": B, "valid": 2}, piece_tokens=500)
    datasets = config.datasets()
    iterators = config.configure(datasets, W, None, None)
    lay = lane_layout(len(stream), W, B)
    seen = []
    for rank, its in enumerate(iterators):
        s = summarize_lm_batches(iter_lm_batches(its["train"], L), keep_tokens=True)
        assert s["continuous"] and s["targets_shifted"]
        steps = -(-lay.lane_len // L)
        assert s["batches"] == steps
        assert s["shapes"][:-1] == [[B, L]] * (steps - 1)
        assert s["shapes"][-1] == [B, lay.lane_len - (steps - 1) * L]
        for b in range(B):
            first, end = s["first_positions"][b], s["end_positions"][b]
            assert first == lay.lane_start(rank, b) and end - first == lay.lane_len
            assert s["inputs"][b] == stream[first:end].tolist()
            assert s["last_targets"][b] == stream[end]
            seen.append((first, end))
    # disjoint parts that cover [0, W * B * lane_len) in rank-major order
    assert seen == sorted(seen)
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:], strict=False))
    assert seen[0][0] == 0 and seen[-1][1] == W * B * lay.lane_len
    assert len(stream) - 1 - seen[-1][1] < W * B

    # a split not in datasets_to_split reaches every worker whole
    whole = LMDataConfig(str(out), batch_size=2, splits=["valid"], datasets_to_split=[])
    parts = whole.configure(whole.datasets(), W, None, None)
    a, b = (summarize_lm_batches(iter_lm_batches(p["valid"], 50)) for p in parts)
    assert a["first_positions"] == b["first_positions"] == [0, (m.splits["valid"].rows - 1) // 2]
    # and the driver-side datasets are that same one-worker layout
    ds = lm_datasets(str(out), batch_size=2, splits=["valid"])["valid"]
    assert summarize_lm_batches(iter_lm_batches(ds, 50)) == a


def test_two_worker_torch_trainer_on_two_cpus_reads_without_deadlock(markov, ray_clean, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out, _, m = markov
    datasets, data_config = lm_ingest(str(out), batch_size={"train": 3, "valid": 2})
    probe = tmp_path / "probe"
    trainer = TorchTrainer(
        lm_probe_loop,
        train_loop_config={
            "out_dir": str(probe),
            "tgt_len": 16,
            "splits": ["train", "valid"],
            "epochs": 2,
        },
        datasets=datasets,
        dataset_config=data_config,
        # 2 x 0.5 CPU on 2 CPUs leaves one for the Ray Data reads (see deqray.data.lm)
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"lm-probe-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path)),
    )
    import ray

    # the situation the name promises: two workers on a cluster of two CPUs
    assert ray.cluster_resources()["CPU"] == 2
    result: dict = {}

    def fit():
        try:
            result["r"] = trainer.fit()
        except BaseException as e:  # reported below, not lost in the thread
            result["error"] = e

    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    # A deadlock never ends: a fit still running after 240 s (it takes ~30 s here) is one.
    runner.join(timeout=240)
    assert not runner.is_alive(), "the 2-worker fit hung (Ray Data starved of CPUs?)"
    assert "error" not in result, result.get("error")
    assert result["r"].error is None
    ranks = [json.loads((probe / f"rank-{r}.json").read_text()) for r in range(2)]
    for split, B in (("train", 3), ("valid", 2)):
        lay = lane_layout(m.splits[split].rows, 2, B)
        spans = []
        for rank, seen in enumerate(ranks):
            assert seen["world_size"] == 2
            first, second = seen[split]
            assert first == second  # each epoch reads the same lanes again
            assert first["continuous"] and first["targets_shifted"]
            assert first["first_positions"] == [lay.lane_start(rank, b) for b in range(B)]
            spans += list(zip(first["first_positions"], first["end_positions"], strict=True))
        assert sorted(spans) == [(g * lay.lane_len, (g + 1) * lay.lane_len) for g in range(2 * B)]
    load_manifest(out, verify="checksum")
