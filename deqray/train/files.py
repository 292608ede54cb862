"""A run directory's files: `metrics.jsonl` (one line per report), `status.json`, checkpoints.

A run is `<storage>/<name>`, local or on remote storage. Rank 0 writes them;
anyone reads them, also while the run goes on. Every write goes through
deqray's retrying file layer (`deqray.data._fs`): an outage shorter than
`DEQRAY_STORAGE_RETRY_S` is waited out, a longer one fails naming the URI.

Checkpoints too: rank 0 uploads each checkpoint directory itself
(`persist_checkpoint`) and hands Ray Train a checkpoint already in the run's
storage (`CheckpointUploadMode.NO_UPLOAD`), instead of letting Ray upload
it. Ray 2.60's own upload (`TrainContext._upload_checkpoint`) tries 3 times
with 1 s and 2 s waits whatever the budget, copies straight into the final
directory (an interrupted upload leaves a partial checkpoint there), and
gives up on an outage of ~20 s. Here each file appears under its final name
only when complete, the wait follows the one retry budget, and a checkpoint
is reported (and so becomes the one a restart resumes from) only once all
its files are in place.
"""

from __future__ import annotations

import json
import math
import os
import posixpath

from deqray.data._fs import Location, locate

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"


def append_metrics(run_uri: str, metrics: dict) -> None:
    """One JSON line per report (re-uploaded whole on remote storage: objects cannot append)."""
    target = locate(run_uri).join(METRICS_FILE)
    line = json.dumps({k: jsonable(v) for k, v in metrics.items()}) + "\n"
    if "://" not in run_uri:
        with open(target.path, "a") as fh:
            fh.write(line)
        return
    old = target.read_bytes() if target.exists() else b""
    target.write_bytes(old + line.encode())


def write_status(run_uri: str, status: str, reason: str, step: int, metrics: dict) -> dict:
    body = {"status": status, "reason": reason, "step": step}
    body["metrics"] = {k: jsonable(v) for k, v in metrics.items()}
    locate(run_uri).join(STATUS_FILE).write_bytes(json.dumps(body, indent=1).encode())
    return body


def read_status(run_uri: str) -> dict | None:
    loc = locate(run_uri).join(STATUS_FILE)
    return json.loads(loc.read_bytes()) if loc.exists() else None


def read_metrics(run_uri: str) -> list[dict]:
    """The run's reports in step order; a step reported twice (after a restore) keeps the last.
    Works on a live run: a last line still being written is left out."""
    loc = locate(run_uri).join(METRICS_FILE)
    if not loc.exists():
        return []
    rows: dict[int, dict] = {}
    for line in loc.read_bytes().decode().split("\n")[:-1]:
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[k] for k in sorted(rows)]


def jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def check_storage(run_uri: str) -> None:
    """RuntimeError unless this worker sees the marker Ray's driver wrote into the run's
    storage. Ray's own checkpoint upload checks it (a local path on a multi-node cluster
    is a different directory on each node); `persist_checkpoint` does not, so rank 0
    checks once when it starts."""
    import ray.train
    from ray.train.v2._internal.constants import VALIDATE_STORAGE_MARKER_FILENAME

    storage = ray.train.get_context().get_storage()
    marker = posixpath.join(storage.experiment_fs_path, VALIDATE_STORAGE_MARKER_FILENAME)
    where = f"{run_uri.rstrip('/')}/{VALIDATE_STORAGE_MARKER_FILENAME}"
    if not Location(storage.storage_filesystem, marker, where).exists():
        raise RuntimeError(
            f"{where}: not found: this worker does not see the run's storage (a local "
            "directory serves one node only; give every node the same storage: s3://..., "
            "or a shared file system)"
        )


def persist_checkpoint(local_dir: str, run_uri: str):
    """Upload the checkpoint directory `local_dir` into the run's storage as a new
    checkpoint directory (Ray Train's naming), file by file through the retrying
    layer; returns the `ray.train.Checkpoint` there, to report with NO_UPLOAD."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    name = storage.make_default_checkpoint_dir_name()
    path = storage.build_checkpoint_path_from_name(name)
    dest = Location(storage.storage_filesystem, path, run_uri.rstrip("/") + "/" + name)
    for root, _, names in os.walk(local_dir):
        for file in sorted(names):
            full = os.path.join(root, file)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            dest.join(rel).upload(full)
    return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)


def checkpoint_uri(run_uri: str, checkpoint) -> str:
    """Where a checkpoint Ray hands back lives, as a deqray URI (read through the
    retrying layer): a directory of the run."""
    return locate(run_uri).join(posixpath.basename(checkpoint.path.rstrip("/"))).uri
