"""`deqray evaluate` and `deqray.load` against independent computations written here.

Two short training runs on the session's Ray, shared with the test files
that train them (tests/shared_runs.py): a language model trained by 2
workers and an MDEQ on preprocessed digits. Then: the language model's test
loss against the loaded model run over the test stream segment by segment
with its memory, NLL summed by hand; top-1/top-5 against scikit-learn on the
loaded model's own predictions; each point of a compute-quality curve
against a separate evaluation at its budget; the best checkpoint; and every
bad input, each a clear error with nothing written over. About a minute.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import deqray
from deqray.cli import main
from deqray.data import load_manifest
from deqray.evaluate import EvaluateError, evaluate_run
from deqray.evaluate.runs import SNAPSHOT
from deqray.tasks._data import embedded_root
from tests import shared_runs


@pytest.fixture(scope="module")
def lm_run(ray_session, session_mlflow_uri, tmp_path_factory):
    """A language model trained by 2 workers for 24 steps, checkpointed every 6, evaluated in
    segments of 12 tokens (trained on 16): shared with tests/test_train.py."""
    run = shared_runs.language_model(tmp_path_factory, session_mlflow_uri)
    assert run.result.return_value["status"] == "finished"
    return run.path


@pytest.fixture(scope="module")
def digits(ray_session, tmp_path_factory):
    """An MDEQ trained for 16 steps, checkpointed every 4, on the digits written to a
    directory of their own: the image classifier's run of tests/test_tasks_contract.py."""
    run = shared_runs.contract_run("image_classification", tmp_path_factory)
    assert run.result.return_value["status"] == "finished"
    return run.path, shared_runs.digits(tmp_path_factory)


def _tokens(manifest, split: str) -> torch.Tensor:
    col = manifest.meta.get("column", "token")
    parts = [
        pq.read_table(u, columns=[col]).column(0).to_numpy() for u in manifest.shard_uris(split)
    ]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def test_language_model_test_loss_equals_the_stream_run_by_hand(lm_run):
    ev = evaluate_run(lm_run, split="test", batch_size=1, progress=False)
    (point,) = ev.points
    model, cfg = deqray.load(lm_run)
    assert not model.training
    tokens = _tokens(load_manifest(embedded_root(cfg.data)), "test")
    x, y = tokens[:-1][None], tokens[1:][None]
    total, mems = 0.0, None
    with torch.no_grad():
        seg = shared_runs.LM_EVAL_TGT_LEN  # data.eval_tgt_len, memory carried
        for i in range(0, x.shape[1], seg):
            out = model(x[:, i : i + seg], y[:, i : i + seg], mems)
            total += float(out.nll.double().sum())
            mems = out.mems
    n = x.shape[1]
    assert point.metrics["test_tokens"] == n
    assert math.isclose(point.metrics["test_loss"] * n, total, rel_tol=1e-6)
    assert math.isclose(point.metrics["test_ppl"], math.exp(total / n), rel_tol=1e-6)
    assert point.metrics["test_fwd_nstep"] > 0 and 0 <= point.metrics["test_fwd_converged"] <= 1
    assert ev.primary == "test_ppl" and ev.step == 24


def test_classification_against_sklearn_on_the_loaded_models_predictions(digits):
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    from deqray.data.vision import DecodeTransform, transform_options

    run, data = digits
    ev = evaluate_run(run, split="test", batch_size=64, progress=False)
    model, cfg = deqray.load(run)
    manifest = load_manifest(str(data))
    table = pq.read_table(manifest.shard_uris("test")[0]).to_pydict()
    for uri in manifest.shard_uris("test")[1:]:
        for k, v in pq.read_table(uri).to_pydict().items():
            table[k] += v
    opts = transform_options(manifest, False, size=(8, 8))
    decoded = DecodeTransform(**opts)(
        {"image": np.array(table["image"], dtype=object), "label": np.array(table["label"])}
    )
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(decoded["image"]))
    labels = np.array(table["label"])
    m = ev.points[0].metrics
    assert m["test_images"] == len(labels) == manifest.splits["test"].rows
    assert m["test_acc"] == pytest.approx(accuracy_score(labels, logits.argmax(1).numpy()))
    top5 = top_k_accuracy_score(labels, logits.numpy(), k=5, labels=list(range(10)))
    assert m["test_top5"] == pytest.approx(top5)
    assert 0 < m["test_acc"] < m["test_top5"] <= 1


def test_each_point_of_the_curve_equals_a_separate_evaluation(digits, tmp_path):
    run, _ = digits
    out = tmp_path / "curve.json"
    assert main(["evaluate", run, "--f-thres", "2,6", "--out", str(out)]) == 0
    curve = json.loads(out.read_text())
    assert [p["f_thres"] for p in curve["points"]] == [2, 6]
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    for point in curve["points"]:
        (alone,) = evaluate_run(run, budgets=[point["f_thres"]], progress=False).points
        assert alone.metrics == point["metrics"]
        assert point["metrics"]["test_fwd_nstep_max"] <= point["f_thres"]
    assert curve["points"][0]["metrics"] != curve["points"][1]["metrics"]
    # one pass gave both points (the snapshots of one solve): they share its time
    assert curve["points"][0]["seconds"] == curve["points"][1]["seconds"]


def test_the_best_checkpoint_is_the_one_with_the_best_primary_metric(lm_run):
    from deqray.evaluate.runs import checkpoints, resolve_checkpoint

    found = checkpoints(lm_run)
    assert len(found) == 4  # steps 6, 12, 18 and 24 (checkpoint.keep=null)
    best = resolve_checkpoint(lm_run, "best")
    assert best.metrics["val_ppl"] == min(c.metrics["val_ppl"] for c in found)
    assert resolve_checkpoint(lm_run, "latest").uri == found[-1].uri
    model, _ = deqray.load(lm_run, checkpoint=best.uri)
    assert not model.training


def _fails(args, capsys, *texts):
    assert main(args) == 2
    err = capsys.readouterr().err
    for text in texts:
        assert text in err, err
    return err


def test_bad_inputs_are_clear_errors_and_nothing_is_written_over(lm_run, digits, tmp_path, capsys):
    run, data = digits
    out = tmp_path / "keep.json"
    out.write_text("earlier results")
    keep = ["--out", str(out)]
    (tmp_path / "notarun").mkdir()
    _fails(["evaluate", str(tmp_path / "notarun"), *keep], capsys, "not a deqray run")
    _fails(["evaluate", str(tmp_path / "nowhere"), *keep], capsys, "no such run directory")
    young = tmp_path / "young"
    young.mkdir()
    (young / "metrics.jsonl").write_text("")
    _fails(["evaluate", str(young), *keep], capsys, "no checkpoint yet")
    _fails(["evaluate", run, "--split", "nope", *keep], capsys, "--split nope", "splits: ")
    _fails(["evaluate", run, "--f-thres", "0", *keep], capsys, "budgets must be >= 1")
    _fails(["evaluate", run, "--f-thres", "2,x", *keep], capsys, "'x' is not a whole number")
    # --checkpoint best when no checkpoint recorded the primary metric
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    snap = json.loads((bare / SNAPSHOT).read_text())
    for entry in snap["checkpoint_results"]:
        entry["metrics"].pop("val_acc", None)
    (bare / SNAPSHOT).write_text(json.dumps(snap))
    _fails(["evaluate", str(bare), "--checkpoint", "best", *keep], capsys, "recorded val_acc")
    # the data has moved: the error says which override to give
    moved = data.parent / "moved"
    os.rename(data, moved)
    try:
        _fails(["evaluate", run, *keep], capsys, "data.source", "pass data.source=")
        assert (
            main(["evaluate", run, f"data.source={moved}", "--out", str(tmp_path / "a.json")]) == 0
        )
    finally:
        os.rename(moved, data)
    # a planted checkpoint that would run code when loaded
    planted = tmp_path / "planted"
    shutil.copytree(run, planted)
    ckpt = sorted(p for p in os.listdir(planted) if p.startswith("checkpoint_2"))[-1]

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"config": RunsCode()}, planted / ckpt / "state.pt")
    _fails(["evaluate", str(planted), *keep], capsys, "state.pt: refused")
    assert not (tmp_path / "ran").exists()
    assert out.read_text() == "earlier results"
    with pytest.raises(EvaluateError, match="--f-thres: budgets are whole numbers"):
        evaluate_run(lm_run, budgets=[0])
