"""Progress lines of long jobs (deqray preprocess, deqray evaluate): done, rate, time left.

No Ray: the line's format, the time left from bytes or counts, and how often a
Meter prints, on a clock the test moves by hand. Cost: well under a second.
"""

from __future__ import annotations

import io
import re

import pytest

from deqray.data.progress import Meter, format_duration, progress_line


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0 s"), (44.6, "45 s"), (59.4, "59 s"), (60, "1 min 00 s"), (185, "3 min 05 s")]
    + [(3599, "59 min 59 s"), (3600, "1 h 00 min"), (7380, "2 h 03 min"), (-3, "0 s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_a_line_with_bytes_takes_the_time_left_from_the_bytes():
    # 10 of 40 shards in 20 s, but 30 MB of 60: the bytes say 20 s more, the count 60 s
    line = progress_line("imagenet", 10, 40, "shards written", 20.0, 30 << 20, 60 << 20)
    assert line == (
        "[imagenet] 10/40 shards written (25%), 0.50/s, 30.0/60.0 MB at 1.5 MB/s, 20 s left"
    )


def test_a_line_without_bytes_takes_the_time_left_from_the_count():
    line = progress_line("wikitext-103 pass 2", 3, 12, "chunks written", 6.0)
    assert line == "[wikitext-103 pass 2] 3/12 chunks written (25%), 0.50/s, 18 s left"
    fast = progress_line("cifar10", 1500, 3000, "rows", 10.0)
    assert fast == "[cifar10] 1,500/3,000 rows (50%), 150/s, 10 s left"


def test_the_last_line_says_how_long_it_took():
    line = progress_line("cityscapes", 8, 8, "shards written", 125.0, 10 << 20, 10 << 20)
    assert line.endswith(", 10.0/10.0 MB at 0.1 MB/s, done in 2 min 05 s")
    assert "left" not in line


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_meter_prints_the_first_piece_then_every_few_seconds_and_the_last():
    clock, out = Clock(), io.StringIO()
    meter = Meter("digits", 6, "shards", every=5.0, out=out, clock=clock)
    for dt in (1.0, 1.0, 1.0, 3.0, 1.0, 1.0):  # pieces done at 101, 102, 103, 106, 107, 108 s
        clock.now += dt
        meter.add()
    lines = out.getvalue().splitlines()
    # at 101 (the first), 106 (5 s after it), 108 (the last); not 102, 103, 107
    assert [re.match(r"\[digits\] (\d)/6", x).group(1) for x in lines] == ["1", "4", "6"]
    assert lines[1] == "[digits] 4/6 shards (67%), 0.67/s, 3 s left"
    assert lines[2] == "[digits] 6/6 shards (100%), 0.75/s, done in 8 s"


def test_a_disabled_meter_counts_and_prints_nothing():
    out = io.StringIO()
    meter = Meter("x", 2, "jobs", enabled=False, out=out, total_bytes=10)
    meter.add(nbytes=4)
    meter.add(nbytes=6)
    assert (meter.done, meter.done_bytes, out.getvalue()) == (2, 10, "")


def test_deqray_evaluate_shows_rate_and_time_left(capsys, monkeypatch):
    from deqray.evaluate import split

    times = iter([0.0, 2.0, 4.0, 6.0, 8.0, 9.0])  # the start, one per batch, the end
    monkeypatch.setattr(split.time, "perf_counter", lambda: next(times))
    progress = split.Progress(total=8, label="test", every=5.0)
    assert list(progress.wrap(range(4))) == [0, 1, 2, 3]
    progress.done()
    err = capsys.readouterr().err.splitlines()
    # 6 s in (3 batches: 0.5/s, 5 left), then at the end (4 in 9 s, 4 left)
    assert err == [
        "[deqray] evaluate test: 3/8 batches, 0.50/s, 10 s left",
        "[deqray] evaluate test: 4/8 batches, 0.44/s, 9 s left",
    ]
