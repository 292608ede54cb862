"""`deqray train` on s3:// end to end, and storage outages while a run checkpoints.

The server is moto's on 127.0.0.1 behind socat (tests/s3_server.py), reached
through the standard AWS settings only. The shards are preprocessed to
s3:// by `deqray preprocess`; checkpoints, metrics.jsonl, status.json and
TensorBoard files go there. Every run's reports are compared with one run of
the same config whose storage is a local directory (`reference`): a resumed
run must continue the same trajectory.

The faults are timed by a hook (`Faults`) in the workers: rank 0
announces, in a local directory, that it is about to write the checkpoint of
a given step and waits until the test has stopped the server; the write then
meets the outage. Rank 0 also records the storage layer's retry warnings
there, and can set a small retry budget for its own process (the session's
Ray workers do not see a change of the test's environment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from ray import cloudpickle
from ray.train import WorkerGroupError

from deqray.cli import main as deqray
from deqray.data import load_manifest, locate
from deqray.data._fs import RETRY_ENV, StorageUnavailable
from deqray.train.driver import fit, read_metrics, read_status
from deqray.train.hooks import Hooks
from deqray.train.state import read_state

pytestmark = pytest.mark.usefixtures("ray_clean")

# the workers cannot import a test module: the hook travels by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

OUTAGE_S = 8.0  # longer than pyarrow's own ~6 s of connection retries
LM = [
    "model.preset=deq-transformer-tiny",
    "data.tgt_len=16",
    "optim.batch_size=8",
    "optim.lr=0.003",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "optim.steps=12",
    "train.pretrain_steps=2",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.log_every=1000",
    "model.dropout=0.1",  # random state a resume must restore
    "checkpoint.keep=null",
]
MARKOV = ["tokens=20000", "vocab_size=40", "branching=6", "seed=3", "shard_tokens=2000"]


def files(server, uri: str) -> list[str]:
    """Keys under an s3:// URI, relative to it, without directory markers."""
    prefix = uri.removeprefix("s3://").partition("/")[2].rstrip("/") + "/"
    return [k[len(prefix) :] for k in server.keys(uri) if not k.endswith("/")]


def trajectory(rows):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def same(a, b):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (s, tl_a, vl_a), (_, tl_b, vl_b) in zip(a, b, strict=True):
        assert math.isclose(tl_a, tl_b, rel_tol=1e-5, abs_tol=1e-6), (s, tl_a, tl_b)
        assert math.isclose(vl_a, vl_b, rel_tol=1e-5, abs_tol=1e-6), (s, vl_a, vl_b)


def checkpoints(run_uri: str) -> dict[str, int]:
    """{checkpoint directory: its step} of the checkpoints Ray Train's snapshot lists."""
    snap = json.loads(locate(f"{run_uri}/checkpoint_manager_snapshot.json").read_bytes())
    names = [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]
    return {n: read_state(f"{run_uri}/{n}")["progress"]["step"] for n in names}


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.create_bucket()


@pytest.fixture(scope="module")
def markov(ray_session, bucket):
    """~5 s: the Markov corpus preprocessed to s3:// by `deqray preprocess`."""
    uri = f"{bucket}/markov"
    assert deqray(["preprocess", "markov", "--out", uri, *(f"--set={s}" for s in MARKOV)]) == 0
    return uri


@pytest.fixture(scope="module")
def reference(markov, tmp_path_factory):
    """~20 s: the runs' config, with its run directory on a local disk, uninterrupted."""
    result = fit(
        "markov-tiny",
        [*LM, f"data.source={markov}"],
        workers=2,
        verbose=False,
        storage=str(tmp_path_factory.mktemp("local-runs")),
    )
    assert result.return_value["status"] == "finished"
    rows = read_metrics(result.path)
    assert [r["step"] for r in rows] == [4, 8, 12]
    return trajectory(rows)


class Faults(Hooks):
    """In the workers. Rank 0, before writing the checkpoint of step `outage_at`: says so
    and waits for the test to stop the server. Every rank, after step `settle_at`: waits
    until Ray Train has recorded a checkpoint (a worker that dies within Ray's polling
    interval of a report could otherwise die before its checkpoint counts)."""

    def __init__(self, signals: str, *, outage_at: int, budget_s=None, settle_at=None):
        self.signals, self.at, self.budget_s, self.settle_at = (
            signals,
            outage_at,
            budget_s,
            settle_at,
        )
        self.step, self.run_uri = 0, ""

    def on_event(self, name, **info):
        if name != "start":
            return
        self.run_uri = info["run_uri"]
        if self.budget_s is not None:
            os.environ[RETRY_ENV] = str(self.budget_s)
        log = logging.getLogger("deqray.storage")
        handler = logging.FileHandler(os.path.join(self.signals, f"retries-{os.getpid()}.log"))
        handler.setLevel(logging.WARNING)
        log.addHandler(handler)

    def on_step(self, step, result, metrics):
        self.step = step
        if step == self.settle_at:
            snapshot = locate(f"{self.run_uri}/checkpoint_manager_snapshot.json")
            deadline = time.monotonic() + 60
            while not snapshot.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    @contextlib.contextmanager
    def phase(self, name):
        if name != "save_state" or self.step != self.at:
            yield
            return
        Path(self.signals, "saving").touch()
        deadline = time.monotonic() + 120
        while not Path(self.signals, "down").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        yield
        Path(self.signals, "saved").write_text(str(time.monotonic() - start))


class Outage:
    """The test's side: stop the server when rank 0 is about to save; start it again after
    `seconds`, or (None) at `end()`."""

    def __init__(self, server, signals: Path, seconds: float | None):
        self.server, self.signals, self.seconds = server, signals, seconds
        self._end = threading.Event()
        self.began = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        deadline = time.monotonic() + 300
        while not (self.signals / "saving").exists():
            if time.monotonic() > deadline or self._end.is_set():
                return
            time.sleep(0.05)
        self.server.down()
        self.began.set()
        (self.signals / "down").touch()
        self._end.wait(self.seconds)
        self.server.up()

    def end(self):
        self._end.set()
        self._thread.join(timeout=30)
        self.server.up()

    def retries(self) -> list[str]:
        return [x for f in self.signals.glob("retries-*.log") for x in f.read_text().splitlines()]


# --------------------------------------------------------------------------- #
# end to end, and faults survived
# --------------------------------------------------------------------------- #


def test_a_run_on_s3_survives_a_killed_worker_and_an_outage_while_checkpointing(
    s3_server, bucket, markov, reference, tmp_path
):
    """~35 s: a 2-worker run from s3:// shards into s3://. Rank 1 dies at step 6: the run
    goes on from the step-4 checkpoint on s3:// (losing steps 5-6). The server goes down
    for 8 s as rank 0 starts writing the step-8 checkpoint: the upload retries with
    backoff and the run goes on (losing nothing). The same trajectory as `reference`;
    TensorBoard's own reader lists the curves from the s3:// run."""
    outage = Outage(s3_server, tmp_path, OUTAGE_S)
    try:
        result = fit(
            "markov-tiny",
            [*LM, f"data.source={markov}", "debug.fail_at_step=6", "debug.fail_rank=1"]
            + ["checkpoint.max_failures=1"],
            workers=2,
            storage=f"{bucket}/runs",
            name="faults",
            hooks=[Faults(str(tmp_path), outage_at=8, settle_at=6)],
            verbose=False,
        )
    finally:
        outage.end()
    run = f"{bucket}/runs/faults"
    assert result.return_value["status"] == "finished" and outage.began.is_set()
    same(reference, trajectory(read_metrics(run)))
    # resumed at step 4, not started over: step 4 was reported once
    lines = locate(f"{run}/metrics.jsonl").read_bytes().decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [4, 8, 12]
    assert read_status(run)["status"] == "finished" and read_status(run)["step"] == 12
    names = files(s3_server, run)
    assert "_faults/step-6" in names
    # the step-8 save lasted the outage, carried by deqray's retries of that file
    assert float((tmp_path / "saved").read_text()) >= OUTAGE_S - 0.5
    retries = outage.retries()
    assert retries and all(f"{run}/checkpoint_" in x for x in retries), retries
    assert all("/state.pt: upload failed" in x for x in retries)
    assert sorted(checkpoints(run).values()) == [4, 8, 12]
    assert not [n for n in names if ".tmp-" in n]  # the failed attempts' leftovers removed

    # TensorBoard's own reader, on the s3:// logdir (boto3, with AWS_ENDPOINT_URL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [n for n in names if n.startswith("tensorboard/events.out.tfevents.")]
    acc = EventAccumulator(f"{run}/tensorboard", size_guidance={"scalars": 0})
    acc.Reload()
    assert {"train/loss", "val/loss", "solver/fwd_nstep"} <= set(acc.Tags()["scalars"])
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    want = {s: tl for s, tl, _ in reference}
    assert got.keys() == want.keys()
    for s in want:
        assert math.isclose(got[s], want[s], rel_tol=1e-5), (s, got[s], want[s])


def test_an_outage_past_the_budget_fails_naming_the_checkpoint_and_the_last_one_resumes(
    s3_server, bucket, markov, reference, tmp_path
):
    """~35 s: with a 2 s retry budget, the outage at the step-8 checkpoint ends the run
    with an error naming the file; the step-4 checkpoint is intact, and `deqray train
    --name` resumes from it (losing steps 5-8, one checkpoint interval) on the same
    trajectory."""
    outage = Outage(s3_server, tmp_path, None)
    overrides = [*LM, f"data.source={markov}"]
    try:
        with pytest.raises(WorkerGroupError) as failed:
            fit(
                "markov-tiny",
                overrides,
                workers=2,
                verbose=False,
                storage=f"{bucket}/runs",
                name="budget",
                hooks=[Faults(str(tmp_path), outage_at=8, budget_s=2)],
            )
    finally:
        outage.end()
    assert outage.began.is_set()
    run = f"{bucket}/runs/budget"
    (rank, error), *_ = failed.value.worker_failures.items()
    message = str(error)  # the worker's exception, whole
    assert rank == 0 and isinstance(error, StorageUnavailable), (type(error), message)
    assert f"{run}/checkpoint_" in message and "/state.pt: upload failed" in message
    assert "the storage was unreachable" in message and "retry budget 2 s" in message
    assert message in str(failed.value)  # also whole in Ray's summary of the failure
    # Ray Train's record holds the last complete checkpoint only, intact
    assert list(checkpoints(run).values()) == [4]
    complete = [n for n in files(s3_server, run) if n.endswith("/state.pt")]
    assert len(complete) == 1 and complete[0].startswith(next(iter(checkpoints(run))))

    argv = ["train", "markov-tiny", *overrides, "--workers", "2", "--quiet"]
    assert deqray([*argv, "--storage", f"{bucket}/runs", "--name", "budget"]) == 0
    same(reference, trajectory(read_metrics(run)))
    assert sorted(checkpoints(run).values()) == [4, 8, 12]
    assert read_status(run)["status"] == "finished"


def test_an_image_set_preprocessed_to_s3_trains_from_s3_into_s3(s3_server, bucket):
    """~30 s: digits shards written to s3:// by `deqray preprocess`, read by Ray Data
    in a 1-worker run whose run directory is on s3:// too, then evaluated and loaded
    from there."""
    data = f"{bucket}/digits"
    assert deqray(["preprocess", "digits", "--out", data, "--set", "shard_mb=0.05"]) == 0
    assert len(load_manifest(data).splits["train"].shards) > 1
    result = fit(
        "digits-tiny",
        ["optim.steps=4", "train.pretrain_steps=2", "train.eval_every=2"]
        + ["train.eval_batches=2", f"data.source={data}"],
        storage=f"{bucket}/runs",
        name="digits",
        verbose=False,
    )
    run = f"{bucket}/runs/digits"
    assert result.return_value["status"] == "finished"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0 <= r["val_acc"] <= 1 and math.isfinite(r["val_loss"]) for r in rows)
    assert sorted(checkpoints(run).values()) == [2, 4]
    assert read_state(f"{run}/{max(checkpoints(run))}")["model_config"] is not None
    # deqray evaluate and deqray.load read the run from s3:// as from a disk
    from deqray import load
    from deqray.evaluate.split import evaluate_run

    ev = evaluate_run(run, split="test", progress=False)
    test_rows = load_manifest(data).splits["test"].rows
    assert ev.points[0].metrics["test_images"] == test_rows
    assert 0 <= ev.points[0].metrics["test_acc"] <= 1
    model, cfg = load(run)
    assert not model.training and cfg.data.source == data
