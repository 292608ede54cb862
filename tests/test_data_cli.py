"""`deqray preprocess` end to end, and its errors.

Each command is a subprocess that joins the session's Ray (conftest's
`ray_address`), as a user's joins a running cluster; the errors come before
Ray is reached."""

from __future__ import annotations

import os
import subprocess
import sys

from deqray.data import load_manifest


def test_preprocess_embedded_sets_and_option_errors(ray_address, tmp_path):
    def run(*args, timeout=300):
        env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_ADDRESS": ray_address}
        return subprocess.run(
            [sys.executable, "-m", "deqray.cli", "preprocess", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    out = run(
        "markov",
        "--out",
        str(tmp_path / "markov"),
        "--set",
        "tokens=20000",
        "--set",
        "vocab_size=50",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "manifest:" in out.stdout and "train:" in out.stdout
    m = load_manifest(tmp_path / "markov", verify="checksum")
    assert m.kind == "lm" and m.meta["best_perplexity"] > 1

    out = run("digits", "--out", str(tmp_path / "digits"))
    assert out.returncode == 0, out.stderr[-2000:]
    m = load_manifest(tmp_path / "digits")
    assert m.kind == "vision" and sum(s.rows for s in m.splits.values()) == 1797
    assert "class_counts: " in out.stdout  # a summary, not a 10-entry dump per line

    out = run("markov", "--out", str(tmp_path / "m2"), "--set", "tokenz=5")
    assert out.returncode == 1
    assert "unknown option 'tokenz' (did you mean 'tokens'?)" in out.stderr
    out = run("imagenett", "--out", str(tmp_path / "x"))
    assert out.returncode == 1 and "did you mean 'imagenet'" in out.stderr
    out = run("imagenet", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert out.returncode == 1 and "missing" in out.stderr
