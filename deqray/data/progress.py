"""Progress lines for long jobs: how much is done of how much, the rate, and the time left.

    meter = Meter("imagenet", total=len(jobs), unit="shards written", total_bytes=size)
    for report in reports:
        meter.add(nbytes=report["raw_bytes"])   # a line at most every `every` s, and the last
    # [imagenet] 12/40 shards written (30%), 0.4/s, 81.2/270.0 MB at 2.7 MB/s, 1 min 10 s left

The time left comes from the bytes when the total is known in bytes (shards
differ in size, bytes do not), else from the count; both at the mean rate so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

MB = 1 << 20


def format_duration(seconds: float) -> str:
    """`45 s`, `3 min 05 s`, `2 h 03 min` (rounded to the second)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_line(
    what: str,
    done: int,
    total: int,
    unit: str,
    elapsed: float,
    done_bytes: int = 0,
    total_bytes: int = 0,
) -> str:
    """`[what] done/total unit (p%), r/s[, a/b MB at m MB/s], t left` (`done` at least 1)."""
    elapsed = max(elapsed, 1e-9)
    line = f"[{what}] {done:,}/{total:,} {unit} ({100 * done / max(total, 1):.0f}%)"
    line += f", {done / elapsed:,.{_digits(done / elapsed)}f}/s"
    if total_bytes:
        line += (
            f", {done_bytes / MB:,.1f}/{total_bytes / MB:,.1f} MB"
            f" at {done_bytes / MB / elapsed:,.1f} MB/s"
        )
    if done >= total:
        return line + f", done in {format_duration(elapsed)}"
    if total_bytes and done_bytes:
        left = (total_bytes - done_bytes) / (done_bytes / elapsed)
    else:
        left = (total - done) / (done / elapsed)
    return line + f", {format_duration(left)} left"


def _digits(rate: float) -> int:
    # enough digits that a slow rate (0.04 shards/s) does not print as 0
    return 0 if rate >= 100 else 1 if rate >= 1 else 2


class Meter:
    """Counts finished work and prints `progress_line` to `out` at most every `every`
    seconds, and always for the last piece; `enabled=False` only counts."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        *,
        total_bytes: int = 0,
        every: float = 5.0,
        enabled: bool = True,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.unit, self.total_bytes = what, total, unit, total_bytes
        self.every, self.enabled, self.out, self.clock = every, enabled, out, clock
        self.done = self.done_bytes = 0
        self.start = clock()
        self._last: float | None = None

    def add(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.done_bytes += nbytes
        now = self.clock()
        due = self._last is None or now - self._last >= self.every or self.done >= self.total
        if self.enabled and due:
            self._last = now
            print(self.line(now), file=self.out or sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (self.clock() if now is None else now) - self.start
        return progress_line(
            self.what,
            self.done,
            self.total,
            self.unit,
            elapsed,
            self.done_bytes,
            self.total_bytes,
        )
