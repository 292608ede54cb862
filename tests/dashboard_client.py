"""`deqray dashboard` as a user starts it, queried through optuna-dashboard's own HTTP API.

    trials = dashboard_trials("runs/quickstart-...")   # [{"number", "state", "values", "params"}]

The server is a `python -m deqray.cli dashboard` subprocess on a free port of
127.0.0.1, stopped by its PID when the trials have been read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.s3_server import free_port


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def dashboard_trials(experiment: str, timeout: float = 60.0) -> list[dict]:
    """Every trial of every study the dashboard of `experiment` lists."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deqray.cli", "dashboard", experiment, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"deqray dashboard exited {proc.returncode}: {proc.stdout.read()}"
                )
            try:
                studies = get_json(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no dashboard on {base} after {timeout:g} s") from None
                time.sleep(0.5)
        trials = []
        for s in studies:
            detail = get_json(f"{base}/api/studies/{s['study_id']}")
            for t in detail["trials"]:
                params = {p["name"]: p["param_external_value"] for p in t["params"]}
                trials.append(
                    {
                        "number": t["number"],
                        "state": t["state"],
                        "values": t.get("values"),
                        "params": params,
                        "study": s["study_name"],
                    }
                )
        return trials
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
