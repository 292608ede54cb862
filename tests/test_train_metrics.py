"""Training / evaluation metrics and the TensorBoard writer, against independent oracles.

The shipped tasks' evaluations run through `deqray.train.evaluation.evaluate`
on canned models (fixed logits, no solve), so the reductions and each task's
metrics are checked against numpy / scikit-learn on the same numbers.

The two-rank tests run real torch.distributed (gloo, a FileStore rendezvous in
a tmp dir, traffic over 127.0.0.1) in two spawned processes; no Ray. The
evaluation's reduction over the ranks is torchmetrics' own sync.
The spawned processes import this module, so sklearn and tensorboard are
imported inside the tests that use them (sklearn alone costs each process
over a second).
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from deqray.tasks.base import EvalOutput
from deqray.tasks.image_classification import ImageClassification
from deqray.tasks.language_model import LanguageModel
from deqray.tasks.segmentation import Segmentation
from deqray.train.evaluation import evaluate
from deqray.train.reduce import TrainStats
from deqray.train.tensorboard import TensorBoardWriter, tag_for


def same(a: dict, b: dict, rel=1e-6) -> bool:
    """Dict equality with float tolerance where NaN equals NaN."""
    if sorted(a) != sorted(b):
        return False
    for k in a:
        x, y = float(a[k]), float(b[k])
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return False
        elif x != pytest.approx(y, rel=rel):
            return False
    return True


# ---------------------------------------------------------------- TrainStats


def test_train_stats_hand_computed():
    st = TrainStats()
    st.add(
        loss=2.0,
        items=100,
        seconds=0.5,
        info_metrics={"fwd_nstep": 10.0, "fwd_rel_residual_max": 1e-3, "fwd_converged": 1.0},
    )
    st.add(
        loss=4.0,
        items=100,
        seconds=1.5,
        info_metrics={
            "fwd_nstep": 20.0,
            "fwd_rel_residual_max": 5e-3,
            "fwd_converged": 0.5,
            "bwd_nstep": 8.0,
            "jac_loss": 0.3,
        },
    )
    st.add(
        loss=3.0,
        items=50,
        seconds=1.0,
        info_metrics={
            "fwd_nstep": 30.0,
            "fwd_rel_residual_max": 2e-3,
            "fwd_converged": 0.0,
            "bwd_nstep": 12.0,
        },
        jac_loss=0.5,
    )
    expected = {
        "train_loss": 3.0,
        "fwd_nstep": 20.0,
        "fwd_rel_residual_max": 5e-3,
        "fwd_converged": 0.5,
        "bwd_nstep": 10.0,  # only the two steps that had a backward solve
        "jac_loss": 0.4,  # only the two steps that computed it
        "step_time": 1.0,
        "items_per_s": 250 / 3.0,
        "steps": 3.0,
    }
    assert same(st.reduce(), expected)
    st.reset()
    assert st.reduce() == {"steps": 0.0}


def test_train_stats_explicit_jac_loss_wins_and_nan_survives():
    st = TrainStats()
    st.add(
        loss=1.0,
        items=1,
        seconds=1.0,
        info_metrics={"jac_loss": 9.0, "x_max": float("nan")},
        jac_loss=1.0,
    )
    st.add(loss=float("nan"), items=1, seconds=1.0, info_metrics={"x_max": 5.0})
    out = st.reduce()
    assert out["jac_loss"] == 1.0
    assert math.isnan(out["x_max"]) and math.isnan(out["train_loss"])
    with pytest.raises(TypeError, match="metric 'fwd_nstep' must be a number, got 'abc'"):
        st.add(loss=1.0, items=1, seconds=1.0, info_metrics={"fwd_nstep": "abc"})


def test_train_stats_histograms_keep_most_recent():
    st = TrainStats(hist_keep=5)
    st.add(
        loss=0,
        items=1,
        seconds=1,
        info_metrics={},
        residuals={"fwd_nstep": torch.tensor([1, 2, 3])},
    )
    st.add(
        loss=0,
        items=1,
        seconds=1,
        info_metrics={},
        residuals={
            "fwd_nstep": torch.tensor([4, 5, 6, 7]),
            "bwd_rel_residual": torch.tensor([0.5], dtype=torch.float64),
        },
    )
    mine = torch.tensor([0.25, 0.5])  # float32 on CPU already: must still be copied
    st.add(loss=0, items=1, seconds=1, info_metrics={}, residuals={"fwd_rel_residual": mine})
    mine[0] = 99.0
    h = st.histograms()
    assert h["fwd_nstep"].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert h["fwd_rel_residual"].tolist() == [0.25, 0.5]
    assert h["fwd_nstep"].dtype == torch.float32 and h["bwd_rel_residual"].dtype == torch.float32
    st.reset()
    assert st.histograms() == {}


# ------------------------------------------------------------- canned models


class _Info:
    def __init__(self, metrics: dict[str, float]) -> None:
        self._m = metrics

    def metrics(self) -> dict[str, float]:
        return dict(self._m)


class Canned(nn.Module):
    """An image model that returns the given logits, batch after batch (and solver metrics)."""

    def __init__(self, outputs, ignore_index: int = 255) -> None:
        super().__init__()
        self.outputs = list(outputs)
        classes = self.outputs[0][0].shape[1]
        self.config = type("Config", (), {"ignore_index": ignore_index, "num_classes": classes})()

    def forward(self, images, sradius=False):
        logits, metrics = self.outputs.pop(0)
        return logits, (_Info(metrics) if metrics else None)

    def loss(self, logits, labels):
        return nn.functional.cross_entropy(logits, labels, ignore_index=self.config.ignore_index)


class CannedLM(nn.Module):
    """A language model that returns the given per-token NLL and checks the memory it gets."""

    def __init__(self, nlls) -> None:
        super().__init__()
        self.nlls = list(nlls)
        self.seen: list = []

    def forward(self, tokens, targets, mems, sradius=False):
        self.seen.append(mems)
        nll = self.nlls.pop(0)
        out = type("Out", (), {})()
        out.nll, out.info, out.mems = nll, None, (torch.full((1,), len(self.seen)),)
        return out


def _images(logits):
    return torch.zeros(logits.shape[0], 1, 1, 1)


# ------------------------------------------------------------- two real ranks

C_SEG = 4


def _rank_data(rank: int) -> dict:
    """Each rank's raw inputs; the test regenerates them for the oracle."""
    g = torch.Generator().manual_seed(100 + rank)
    steps = []
    for i in range(3 if rank == 0 else 2):
        info = {
            "fwd_nstep": float(torch.randint(5, 30, (1,), generator=g)),
            "fwd_rel_residual_max": float(torch.rand(1, generator=g)),
            "fwd_converged": float(torch.rand(1, generator=g)),
        }
        if rank == 0:  # rank 1 only pretrains: no backward solver, no Jacobian loss
            info["bwd_nstep"] = float(i + 7)
            info["bwd_rel_residual_max"] = 0.1 * (i + 1)
        # a NaN worst value on one rank must reach every rank as NaN
        info["sradius_max"] = math.nan if (rank, i) == (1, 1) else 0.5 + 0.1 * i
        steps.append(
            dict(
                loss=float(torch.rand(1, generator=g)) + 1,
                items=64 + 8 * rank + i,
                seconds=0.1 * (i + 1) + rank,
                info_metrics=info,
                jac_loss=0.25 * i if rank == 0 and i else None,
            )
        )
    seg_logits = torch.randn(2, C_SEG, 5, 6, generator=g)
    seg_labels = torch.randint(0, C_SEG, (2, 5, 6), generator=g)
    seg_labels[0, 0, :3] = 255
    cls_logits = torch.randn(7, 6, generator=g)
    cls_labels = torch.randint(0, 6, (7,), generator=g)
    nll = torch.rand(2, 5, generator=g) * (rank + 1)
    return dict(
        steps=steps,
        seg_logits=seg_logits,
        seg_labels=seg_labels,
        cls_logits=cls_logits,
        cls_labels=cls_labels,
        nll=nll,
    )


def _rank_results(rank: int, data: dict) -> dict:
    st = TrainStats()
    for s in data["steps"]:
        st.add(**s)
    seg_model = Canned([(data["seg_logits"], None)])
    seg_batches = [(_images(data["seg_logits"]), data["seg_labels"])]
    # rank 1 has no batch at all: its sums (and confusion matrix) count as zeros
    one_model = Canned([(data["seg_logits"], None)])
    one_batches = [(_images(data["seg_logits"]), data["seg_labels"])] if rank == 0 else []
    cls_out = [
        (data["cls_logits"], {"fwd_nstep": 10.0 * (rank + 1), "fwd_rel_residual_max": 0.1 + rank})
    ]
    if rank == 0:  # solver means weigh each batch, not each rank: (10 + 40 + 20) / 3
        cls_out.insert(
            0, (data["cls_logits"][:3], {"fwd_nstep": 40.0, "fwd_rel_residual_max": 0.2})
        )
    cls_batches = [
        (_images(lg), lab)
        for (lg, _), lab in zip(
            cls_out,
            ([data["cls_labels"][:3]] if rank == 0 else []) + [data["cls_labels"]],
            strict=True,
        )
    ]
    tokens = torch.zeros(2, 5, dtype=torch.long)
    lm_batches = [type("B", (), {"tokens": tokens, "targets": tokens})()]
    return dict(
        train=st.reduce(),
        seg=evaluate(Segmentation(), seg_model, seg_batches),
        seg_one=evaluate(Segmentation(), one_model, one_batches),
        cls=evaluate(ImageClassification(), Canned(cls_out), cls_batches),
        lm=evaluate(LanguageModel(), CannedLM([data["nll"]]), lm_batches),
    )


def _worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        out = _rank_results(rank, _rank_data(rank))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"out{rank}.pkl"), "wb") as fh:
        pickle.dump(out, fh)


def nanmax(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _train_oracle(per_rank_steps: list[list[dict]]) -> dict:
    """Per rank: mean over its steps having a key, max of `_max` keys; then ranks averaged."""
    rank_vals = []
    for steps in per_rank_steps:
        vals: dict[str, list[float]] = {
            "train_loss": [s["loss"] for s in steps],
            "step_time": [s["seconds"] for s in steps],
        }
        for s in steps:
            m = dict(s["info_metrics"])
            if s["jac_loss"] is not None:
                m["jac_loss"] = s["jac_loss"]
            for k, v in m.items():
                vals.setdefault(k, []).append(v)
        rank_vals.append(
            {k: nanmax(v) if k.endswith("_max") else sum(v) / len(v) for k, v in vals.items()}
        )
    out = {}
    for k in {k for r in rank_vals for k in r}:
        have = [r[k] for r in rank_vals if k in r]
        out[k] = nanmax(have) if k.endswith("_max") else sum(have) / len(have)
    items = sum(s["items"] for steps in per_rank_steps for s in steps)
    mean_secs = np.mean([sum(s["seconds"] for s in steps) for steps in per_rank_steps])
    out["items_per_s"] = items / mean_secs
    out["steps"] = float(max(len(s) for s in per_rank_steps))
    return out


def test_two_ranks_gloo_agree_with_oracle(tmp_path):
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    torch.multiprocessing.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    outs = [pickle.loads((tmp_path / f"out{r}.pkl").read_bytes()) for r in range(2)]
    data = [_rank_data(r) for r in range(2)]
    for name in outs[0]:
        assert same(outs[0][name], outs[1][name]), name

    train = outs[0]["train"]
    assert "bwd_nstep" in train and "jac_loss" in train  # from rank 0 alone
    assert math.isnan(train["sradius_max"])
    assert same(train, _train_oracle([d["steps"] for d in data]))

    # segmentation: the summed confusion matrix against sklearn on both ranks' pixels
    pred = torch.cat([d["seg_logits"].argmax(1) for d in data]).flatten().numpy()
    target = torch.cat([d["seg_labels"] for d in data]).flatten().numpy()
    keep = target != 255
    conf = sk_confusion_matrix(target[keep], pred[keep], labels=list(range(C_SEG)))
    pixels = int(keep.sum())
    ce = sum(
        float(nn.functional.cross_entropy(d["seg_logits"], d["seg_labels"], ignore_index=255))
        * int((d["seg_labels"] != 255).sum())
        for d in data
    )
    seg = outs[0]["seg"]
    per_class = {k: v for k, v in seg.items() if k.startswith("val_iou_")}
    assert same(
        {k: v for k, v in seg.items() if k not in per_class},
        {
            "val_loss": ce / pixels,
            "val_pixels": pixels,
            "val_miou": _iou_oracle(pred, target),
            "val_pixel_acc": np.trace(conf) / conf.sum(),
        },
    )
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert same(per_class, {f"val_iou_{c}": iou[c] for c in range(C_SEG)})
    p0, t0 = data[0]["seg_logits"].argmax(1).flatten().numpy(), data[0]["seg_labels"].flatten()
    assert outs[0]["seg_one"]["val_miou"] == pytest.approx(_iou_oracle(p0, t0.numpy()))

    logits = torch.cat([data[0]["cls_logits"][:3], data[0]["cls_logits"], data[1]["cls_logits"]])
    labels = torch.cat([data[0]["cls_labels"][:3], data[0]["cls_labels"], data[1]["cls_labels"]])
    top5 = np.argsort(-logits.numpy(), axis=1)[:, :5]
    assert same(
        outs[0]["cls"],
        {
            "val_loss": float(nn.functional.cross_entropy(logits.double(), labels)),
            "val_images": 17.0,
            "val_acc": np.mean(logits.numpy().argmax(1) == labels.numpy()),
            "val_top5": np.mean([int(lab) in row for lab, row in zip(labels, top5, strict=True)]),
            "val_fwd_nstep": 70.0 / 3,
            "val_fwd_rel_residual_max": 1.1,
        },
    )
    nll = torch.cat([d["nll"].flatten() for d in data]).double()
    assert same(
        outs[0]["lm"],
        {"val_loss": float(nll.mean()), "val_ppl": math.exp(nll.mean()), "val_tokens": 20.0},
    )


C_UNEVEN, K_UNEVEN = 5, 7  # segmentation classes (4: nowhere), image classes


def _uneven_shard(rank: int) -> dict:
    """Rank 0: two batches of each kind, rank 1: one of other sizes; class 3 of the
    segmentation only on rank 1, ignored pixels on both."""
    g = torch.Generator().manual_seed(200 + rank)
    seg, cls, lm = [], [], []
    for n in (3, 1) if rank == 0 else (2,):
        logits = torch.randn(n, C_UNEVEN, 4, 6, generator=g)
        logits[:, 4] = -1e9
        labels = torch.randint(0, 3 if rank == 0 else 4, (n, 4, 6), generator=g)
        if rank == 0:
            logits[:, 3] = -1e9
        labels[:, 0, rank : rank + 3] = 255
        seg.append((logits, labels))
    # the solver's statistics: a mean over the three batches, a NaN worst from rank 1
    solver = [(10.0, 0.5), (20.0, 0.25)] if rank == 0 else [(60.0, math.nan)]
    for n, (nstep, worst) in zip((5, 6) if rank == 0 else (4,), solver, strict=True):
        info = {"fwd_nstep": nstep, "fwd_rel_residual_max": worst}
        cls.append(
            (
                torch.randn(n, K_UNEVEN, generator=g),
                torch.randint(0, K_UNEVEN, (n,), generator=g),
                info,
            )
        )
    for shape in ((2, 5), (2, 3)) if rank == 0 else ((3, 4),):
        lm.append(torch.rand(shape, generator=g) * 4)
    return dict(seg=seg, cls=cls, lm=lm)


def _uneven_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the group on 127.0.0.1 only
    # a FileStore rendezvous: a free port picked beforehand can be taken by
    # another process before rank 0 binds it (seen once under the suite)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/ustore", rank=rank, world_size=2)
    data = _uneven_shard(rank)
    try:
        out = dict(
            seg=evaluate(
                Segmentation(),
                Canned([(lg, None) for lg, _ in data["seg"]]),
                [(_images(lg), lab) for lg, lab in data["seg"]],
            ),
            cls=evaluate(
                ImageClassification(),
                Canned([(lg, info) for lg, _, info in data["cls"]]),
                [(_images(lg), lab) for lg, lab, _ in data["cls"]],
            ),
            lm=evaluate(
                LanguageModel(), CannedLM(data["lm"]), _lm_batches(*(n.shape for n in data["lm"]))
            ),
        )
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"uneven{rank}.pkl"), "wb") as fh:
        pickle.dump(out, fh)


def test_uneven_shards_over_gloo_agree_with_sklearn(tmp_path):
    """torchmetrics' own sync over a gloo group on 127.0.0.1: every rank gets the metrics
    of all the ranks' data, as scikit-learn computes them on the concatenation."""
    from sklearn.metrics import accuracy_score, jaccard_score, top_k_accuracy_score

    torch.multiprocessing.spawn(_uneven_worker, args=(str(tmp_path),), nprocs=2, join=True)
    outs = [pickle.loads((tmp_path / f"uneven{r}.pkl").read_bytes()) for r in range(2)]
    shards = [_uneven_shard(r) for r in range(2)]
    for name in outs[0]:
        assert same(outs[0][name], outs[1][name]), name

    seg = [b for d in shards for b in d["seg"]]
    pred = np.concatenate([lg.argmax(1).flatten().numpy() for lg, _ in seg])
    target = np.concatenate([lab.flatten().numpy() for _, lab in seg])
    keep = target != 255
    labels = list(range(C_UNEVEN))
    iou = jaccard_score(target[keep], pred[keep], labels=labels, average=None, zero_division=0)
    absent = ~np.isin(range(C_UNEVEN), np.concatenate([target[keep], pred[keep]]))
    iou[absent] = math.nan  # sklearn's 0/0 is 0; deqray's is no IoU
    assert math.isnan(iou[4]) and not math.isnan(iou[3])  # absent everywhere / rank 1 only
    ce = sum(
        float(nn.functional.cross_entropy(lg.double(), lab, ignore_index=255, reduction="sum"))
        for lg, lab in seg
    )
    assert same(
        outs[0]["seg"],
        {
            "val_miou": _iou_oracle(pred, target),
            "val_pixel_acc": accuracy_score(target[keep], pred[keep]),
            "val_loss": ce / keep.sum(),
            "val_pixels": keep.sum(),
            **{f"val_iou_{c}": iou[c] for c in range(C_UNEVEN)},
        },
    )

    cls = [b for d in shards for b in d["cls"]]
    logits = torch.cat([lg for lg, _, _ in cls]).double()
    labels = torch.cat([lab for _, lab, _ in cls])
    assert same(
        outs[0]["cls"],
        {
            "val_acc": accuracy_score(labels, logits.argmax(1)),
            "val_top5": top_k_accuracy_score(labels, logits, k=5, labels=range(K_UNEVEN)),
            "val_loss": float(nn.functional.cross_entropy(logits, labels)),
            "val_images": 15,
            "val_fwd_nstep": 30.0,
            "val_fwd_rel_residual_max": math.nan,
        },
    )

    nll = np.concatenate([n.flatten().numpy() for d in shards for n in d["lm"]]).astype(float)
    assert same(
        outs[0]["lm"],
        {"val_loss": nll.mean(), "val_ppl": math.exp(nll.mean()), "val_tokens": 28},
    )


# ------------------------------------------------------------ task evaluations


def _iou_oracle(pred: np.ndarray, target: np.ndarray, ignore: int = 255) -> float:
    """Mean IoU from pixel index sets, over classes in the prediction or the target."""
    idx = [i for i in range(len(target)) if target[i] != ignore]
    ious = []
    for c in sorted({int(pred[i]) for i in idx} | {int(target[i]) for i in idx}):
        p = {i for i in idx if pred[i] == c}
        t = {i for i in idx if target[i] == c}
        ious.append(len(p & t) / len(p | t))
    return float(np.mean(ious))


def _lm_batches(*shapes):
    out = []
    for shape in shapes:
        tokens = torch.zeros(shape, dtype=torch.long)
        out.append(type("B", (), {"tokens": tokens, "targets": tokens})())
    return out


def test_lm_perplexity_memory_and_overflow():
    nlls = [torch.full((2, 5), 3.0), torch.full((4, 5), 0.6)]
    model = CannedLM(nlls)
    out = evaluate(LanguageModel(), model, _lm_batches((2, 5), (4, 5)))
    assert same(out, {"val_loss": 1.4, "val_ppl": math.exp(1.4), "val_tokens": 30})
    # the first batch starts without memory; the next gets the memory it returned
    assert model.seen[0] is None and model.seen[1][0].item() == 1
    big = evaluate(LanguageModel(), CannedLM([torch.full((1, 1), 800.0)]), _lm_batches((1, 1)))
    assert big["val_ppl"] == math.inf
    # no token at all: only the count, no NaN metrics
    assert evaluate(LanguageModel(), CannedLM([]), []) == {"val_tokens": 0.0}


def test_classification_against_numpy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(37, 10, generator=g), torch.randint(0, 10, (37,), generator=g)
    outputs = [
        (logits[:16], {"fwd_nstep": 10.0, "fwd_rel_residual_max": 0.5, "sradius": 0.9}),
        (logits[16:], {"fwd_nstep": 20.0, "fwd_rel_residual_max": 0.2}),
    ]
    batches = [(_images(logits[:16]), labels[:16]), (_images(logits[16:]), labels[16:])]
    model = Canned(outputs)
    model.train()
    out = evaluate(ImageClassification(), model, batches)
    assert model.training  # the evaluation restores the mode it found
    lg, lb = logits.numpy(), labels.numpy()
    top5 = np.argsort(-lg, axis=1)[:, :5]
    expected = {
        "val_loss": float(nn.functional.cross_entropy(logits, labels)),
        "val_images": 37,
        "val_acc": np.mean(lg.argmax(1) == lb),
        "val_top5": np.mean([lb[i] in top5[i] for i in range(37)]),
        "val_fwd_nstep": 15.0,
        "val_fwd_rel_residual_max": 0.5,
        "val_sradius": 0.9,
    }
    assert same(out, expected)
    assert 0 < out["val_acc"] < out["val_top5"] < 1  # the oracle is not trivially 0 or 1

    # fewer than 5 classes: no top-5
    small = evaluate(
        ImageClassification(),
        Canned([(torch.eye(3) * 50, None)]),
        [(_images(torch.eye(3)), torch.tensor([0, 1, 0]))],
    )
    assert set(small) == {"val_loss", "val_images", "val_acc"}
    assert small["val_acc"] == pytest.approx(2 / 3) and small["val_images"] == 3


def test_segmentation_against_sklearn_and_sets():
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    g = torch.Generator().manual_seed(1)
    c = 5  # class 4 appears in neither the labels nor the predictions
    logits = torch.randn(3, c, 8, 7, generator=g)
    logits[:, 4] = -1e9
    labels = torch.randint(0, 4, (3, 8, 7), generator=g)
    labels[:, :2, :] = 255
    logits[:, 1, :2, :] = 1e9  # ignored pixels predicted as 1: must not count
    model = Canned([(logits[:2], None), (logits[2:], None)])
    batches = [(_images(logits[:2]), labels[:2]), (_images(logits[2:]), labels[2:])]
    out = evaluate(Segmentation(), model, batches)

    pred, target = logits.argmax(1).flatten().numpy(), labels.flatten().numpy()
    keep = target != 255
    oracle = sk_confusion_matrix(target[keep], pred[keep], labels=list(range(c)))
    ce = sum(
        float(nn.functional.cross_entropy(lg, lab, ignore_index=255)) * int((lab != 255).sum())
        for lg, lab in ((logits[:2], labels[:2]), (logits[2:], labels[2:]))
    )
    assert same(
        {k: v for k, v in out.items() if not k.startswith("val_iou_")},
        {
            "val_loss": ce / keep.sum(),
            "val_pixels": keep.sum(),
            "val_pixel_acc": np.mean(pred[keep] == target[keep]),
            "val_miou": _iou_oracle(pred, target),
        },
    )
    assert math.isnan(out["val_iou_4"])  # absent from both: no IoU, not 0
    per_class = np.diag(oracle) / (oracle.sum(0) + oracle.sum(1) - np.diag(oracle) + 1e-300)
    assert out["val_miou"] != pytest.approx(per_class.mean())  # class 4 was really left out
    assert [out[f"val_iou_{k}"] for k in range(4)] == pytest.approx(per_class[:4].tolist())


def _one_hot_logits(pred: list[int], classes: int) -> torch.Tensor:
    """(1, C, 1, P) logits whose argmax over C is `pred`."""
    return nn.functional.one_hot(torch.tensor(pred), classes).T.float()[None, :, None, :] * 10


def test_miou_hand_computed_and_errors():
    def seg(pred, target, classes):
        logits = _one_hot_logits(pred, classes)
        target = torch.tensor([target])[:, None, :]
        return evaluate(Segmentation(), Canned([(logits, None)]), [(_images(logits), target)])

    # rows target, columns prediction: [[2, 1], [0, 3]]
    out = seg([0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], 2)
    assert out["val_miou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert [out["val_iou_0"], out["val_iou_1"]] == pytest.approx([2 / 3, 3 / 4])
    # class 1 absent from both: left out; class 2 only predicted: IoU 0; 255 ignored
    out = seg([0, 0, 0, 1, 1], [0, 0, 2, 255, 255], 3)
    assert out["val_miou"] == pytest.approx((2 / 3 + 0) / 2) and math.isnan(out["val_iou_1"])
    assert out["val_pixels"] == 3 and out["val_pixel_acc"] == pytest.approx(2 / 3)
    # no labelled pixel at all: only the count
    assert seg([0, 1], [255, 255], 2) == {"val_pixels": 0.0}
    with pytest.raises(ValueError, match=r"target has class 7 outside \[0, 3\)"):
        seg([0, 1], [7, 255], 3)


class _Misnamed(ImageClassification):
    def eval_step(self, model, batch, state, *, sradius):
        out = super().eval_step(model, batch, state, sradius=sradius)
        return EvalOutput(out.sums, out.info, updates={"accuracy": out.updates["acc"]})


def test_an_update_of_no_declared_metric_names_the_nearest():
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"updates\['accuracy'\] .*did you mean 'acc'"):
        evaluate(_Misnamed(), Canned([(logits, None)]), [(_images(logits), torch.zeros(4).long())])


# ---------------------------------------------------------------- TensorBoard


@pytest.mark.parametrize(
    "key, tag",
    [
        ("train_loss", "train/loss"),
        ("val_loss", "val/loss"),
        ("val_ppl", "val/ppl"),
        ("val_miou", "val/miou"),
        ("fwd_nstep", "solver/fwd_nstep"),
        ("bwd_rel_residual_max", "solver/bwd_rel_residual_max"),
        ("val_fwd_nstep", "solver/val_fwd_nstep"),
        ("jac_loss", "jacobian/jac_loss"),
        ("sradius", "jacobian/sradius"),
        ("val_sradius_max", "jacobian/val_sradius_max"),
        ("lr", "optim/lr"),
        ("grad_norm", "optim/grad_norm"),
        ("step_time", "perf/step_time"),
        ("items_per_s", "perf/items_per_s"),
        ("steps", "perf/steps"),
        ("already/grouped", "already/grouped"),
        ("epoch", "other/epoch"),
    ],
)
def test_tag_for(key, tag):
    assert tag_for(key) == tag


def test_tag_for_prefix_map_first():
    assert tag_for("eval2_loss", {"eval2_": "eval2"}) == "eval2/loss"
    assert tag_for("train_loss", {"train": "t"}) == "t/_loss"


def _read(logdir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logdir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def _write(w: TensorBoardWriter) -> None:
    for step in range(3):
        w.scalars(
            {
                "train_loss": 1.0 / (step + 1),
                "fwd_nstep": 10.0 + step,
                "lr": 1e-3,
                "status": "running",
                "val_ppl": float("nan") if step == 2 else 5.0,
            },
            step,
        )
    w.histograms({"fwd_rel_residual": torch.tensor([1e-3, 2e-3, float("inf"), 4e-3])}, step=2)
    w.text("config", "f_thres: 24", step=0)


def _check(logdir: str) -> None:
    acc = _read(logdir)
    assert sorted(acc.Tags()["scalars"]) == [
        "optim/lr",
        "solver/fwd_nstep",
        "train/loss",
        "val/ppl",
    ]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert math.isnan(acc.Scalars("val/ppl")[2].value)
    (h,) = acc.Histograms("solver/fwd_rel_residual")
    assert (h.step, h.histogram_value.num) == (2, 3)  # inf dropped
    assert h.histogram_value.max == pytest.approx(4e-3)
    assert h.histogram_value.sum == pytest.approx(7e-3)
    (t,) = acc.Tensors("config/text_summary")
    assert t.tensor_proto.string_val[0].decode() == "f_thres: 24"


def test_tensorboard_local_dir(tmp_path):
    with TensorBoardWriter(tmp_path / "run") as w:
        _write(w)
        w.flush()
        assert w.logdir == str(tmp_path / "run" / "tensorboard")
        _check(w.logdir)
    w.close()  # a second close is harmless


def test_tensorboard_uri_uploads_on_flush_and_close(tmp_path):
    dest = tmp_path / "bucket" / "run" / "tb"
    w = TensorBoardWriter(f"file://{tmp_path}/bucket/run", subdir="tb")
    assert w.local_dir != str(dest)  # really the upload branch
    _write(w)
    assert not dest.exists()
    w.flush()
    _check(str(dest))
    w.scalars({"train_loss": 0.1}, step=3)
    w.close()
    w.close()
    assert not os.path.exists(w.local_dir)
    assert [e.step for e in _read(str(dest)).Scalars("train/loss")] == [0, 1, 2, 3]
    assert not [p for p in dest.iterdir() if p.name.startswith(".tmp-")]
