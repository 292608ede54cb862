"""A run directory's own files: `metrics.jsonl` (one line per report) and `status.json`.

A run is `<storage>/<name>`, local or on remote storage; Ray Train writes the
checkpoints beside these. Rank 0 writes them; anyone reads them, also while
the run goes on.
"""

from __future__ import annotations

import json
import math

from deqray.data._fs import locate

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
