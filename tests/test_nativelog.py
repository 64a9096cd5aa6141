"""What C libraries write to fd 2 reaches the log whole for an ordinary bad file, and at a bounded rate
when a client sends a file made to fill the log (``optimizer.nativelog``)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from optimizer.nativelog import (
    LINE_BURST,
    LINES_PER_SECOND,
    MAX_LINE_CHARS,
    NATIVE_LOGGER,
    SUMMARY_SECONDS,
    LineBudget,
    Relay,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _relay_all(data: bytes, clock: FakeClock | None = None) -> None:
    """Runs a relay over a pipe holding ``data`` until its end of file."""
    read_fd, write_fd = os.pipe()

    def write() -> None:
        os.write(write_fd, data)
        os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    Relay(read_fd, clock=clock or FakeClock()).run()
    writer.join()


def _native(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == NATIVE_LOGGER]


def _suppressed(record: logging.LogRecord) -> int | None:
    fields = getattr(record, "fields", {})
    return fields.get("suppressed") if fields.get("event") == "native_suppressed" else None


def test_a_few_lines_pass_whole(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    _relay_all(b"TIFFReadDirectory: Warning, Unknown field with tag 40000.\n\n   \nno end of line")
    messages = [r.getMessage() for r in _native(caplog)]
    assert messages == ["TIFFReadDirectory: Warning, Unknown field with tag 40000.", "no end of line"]
    assert all(r.levelno == logging.WARNING for r in _native(caplog))


def test_a_flood_of_lines_is_cut_to_the_burst_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    _relay_all(b"".join(b"line %d\n" % i for i in range(4000)))
    records = _native(caplog)
    lines = [r for r in records if _suppressed(r) is None]
    summaries = [r for r in records if _suppressed(r) is not None]
    assert [r.getMessage() for r in lines] == [f"line {i}" for i in range(LINE_BURST)]
    assert len(summaries) == 1
    assert _suppressed(summaries[0]) == 4000 - LINE_BURST
    assert str(4000 - LINE_BURST) in summaries[0].getMessage()


def test_a_long_line_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    _relay_all(b"x" * (MAX_LINE_CHARS * 10) + b"\nafter\n")
    messages = [r.getMessage() for r in _native(caplog)]
    assert messages[0].startswith("x" * MAX_LINE_CHARS + "...")
    assert len(messages[0]) < MAX_LINE_CHARS + 100
    assert "after" in messages  # the next line is its own record


def test_bytes_that_are_not_utf8_are_replaced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    _relay_all(b"bad \xff\xfe bytes\n")
    assert [r.getMessage() for r in _native(caplog)] == ["bad \ufffd\ufffd bytes"]


def test_the_budget_refills_over_time() -> None:
    clock = FakeClock()
    budget = LineBudget(burst=3, per_second=2.0, clock=clock)
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one line's worth
    assert [budget.take(), budget.take()] == [True, False]
    clock.now += 100  # never more than the burst
    assert sum(budget.take() for _ in range(10)) == 3
    assert budget.dropped == 2 + 7


def test_a_count_is_logged_once_the_flood_goes_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Without waiting for the end of file: the relay runs for the life of the process."""
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    read_fd, write_fd = os.pipe()
    relay = threading.Thread(target=Relay(read_fd).run)
    relay.start()
    try:
        os.write(write_fd, b"".join(b"warning %d\n" % i for i in range(LINE_BURST + 5)))
        deadline = time.monotonic() + 30
        while not any(_suppressed(r) for r in _native(caplog)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.close(write_fd)
        relay.join(10)
    summaries = [_suppressed(r) for r in _native(caplog) if _suppressed(r) is not None]
    assert summaries == [5]


def test_a_steady_flood_is_counted_every_so_often_and_nothing_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each line, logged or counted, is accounted for; what is logged stays within the bucket."""
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)

    class Ticking(FakeClock):
        def __call__(self) -> float:
            self.now += 0.01
            return self.now

    clock = Ticking()
    start = clock.now
    _relay_all(b"".join(b"line %d\n" % i for i in range(4000)), clock)
    simulated = clock.now - start
    records = _native(caplog)
    counts = [n for r in records if (n := _suppressed(r)) is not None]
    logged = len(records) - len(counts)
    assert logged + sum(counts) == 4000
    assert logged <= LINE_BURST + simulated * LINES_PER_SECOND + 1
    assert len(counts) <= simulated / SUMMARY_SECONDS + 2
    assert len(counts) >= 2  # not only the one at the end
