"""`deqray preprocess` end to end, and its errors."""

from __future__ import annotations

import subprocess
import sys

from deqray.data import load_manifest


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "deqray.cli", "preprocess", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    )


def test_preprocess_embedded_sets_and_option_errors(tmp_path):
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
