"""What C libraries write to fd 2 reaches the log whole for an ordinary bad file, and at a bounded rate
when a client sends a file made to fill the log (``optimizer.nativelog``)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from optimizer import nativelog
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


@pytest.mark.parametrize("marks", [False, True], ids=["idle pipe", "jobs' marks flowing"])
def test_a_count_is_logged_once_the_flood_goes_quiet(caplog: pytest.LogCaptureFixture, marks: bool) -> None:
    """Without waiting for the end of file: the relay runs for the life of the process. Under traffic
    jobs write marks all the time: the count is due QUIET_SECONDS after the last line, not after the
    pipe's last byte (found in review)."""
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    read_fd, write_fd = os.pipe()
    relay = threading.Thread(target=Relay(read_fd).run)
    relay.start()
    try:
        os.write(write_fd, b"".join(b"warning %d\n" % i for i in range(LINE_BURST + 5)))
        deadline = time.monotonic() + 30
        while not any(_suppressed(r) for r in _native(caplog)) and time.monotonic() < deadline:
            if marks:
                os.write(write_fd, mark(b"+1 req") + mark(b"-1"))
            time.sleep(0.05)
        assert any(_suppressed(r) for r in _native(caplog)), "no count while the relay ran"
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


def _marks(caplog: pytest.LogCaptureFixture) -> list[tuple[str, list[str]]]:
    return [
        (r.getMessage(), getattr(r, "fields", {}).get("request_ids", []))
        for r in _native(caplog)
        if _suppressed(r) is None
    ]


def mark(body: bytes) -> bytes:
    """A job's mark as ``nativelog.attributed`` writes it."""
    return nativelog._START + nativelog._token + body + nativelog._END


def test_lines_are_named_with_the_requests_whose_jobs_were_running(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    stream = (
        b"before any job\n"
        + mark(b"+1 req-a")
        + b"TIFFReadDirectory: from a\n"
        + mark(b"+2 req-b")
        + b"both running\n"
        + mark(b"-1")
        + b"only b\n"
        + mark(b"-2")
        + b"after\n"
    )
    # Every way the pipe's reads can cut it, marks included.
    for size in (len(stream), 1, 2, 7, 19):
        caplog.clear()
        read_fd, write_fd = os.pipe()
        relay = Relay(read_fd, clock=FakeClock())
        for at in range(0, len(stream), size):
            relay.feed(stream[at : at + size])
        relay.feed(b"", end=True)
        os.close(read_fd)
        os.close(write_fd)
        assert _marks(caplog) == [
            ("before any job", []),
            ("TIFFReadDirectory: from a", ["req-a"]),
            ("both running", ["req-a", "req-b"]),
            ("only b", ["req-b"]),
            ("after", []),
        ], size


def test_a_line_torn_by_another_jobs_mark_is_named_with_both(caplog: pytest.LogCaptureFixture) -> None:
    # libtiff writes a warning in three pieces; another worker's mark can fall between them.
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    _relay_all(mark(b"+1 req-a") + b"TIFFReadDirectory: " + mark(b"+2 req-b") + mark(b"-1") + b"Unknown.\n")
    assert _marks(caplog) == [("TIFFReadDirectory: Unknown.", ["req-a", "req-b"])]


def test_a_mark_without_the_token_is_text(caplog: pytest.LogCaptureFixture) -> None:
    # A file's bytes quoted in a library's message cannot name or end a request.
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    forged = nativelog._START + b"0123456789abcdef+1 forged" + nativelog._END
    _relay_all(mark(b"+1 real") + forged + b" said\n" + nativelog._START + b"lone\n" + mark(b"-1"))
    records = _marks(caplog)
    assert [ids for _, ids in records] == [["real"], ["real"]]
    assert "forged" in records[0][0]


def test_jobs_write_marks_only_while_a_relay_reads_the_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with nativelog.attributed("req-1"):
            pass  # embedded: no relay, and fd 2 is the host's
        nativelog.start_marks(write_fd)
        with pytest.raises(ValueError), nativelog.attributed("req-2"):
            raise ValueError
        with nativelog.attributed("req-3"):
            nativelog.stop_marks()  # at exit, with a job still running: its end is not written
        with nativelog.attributed("req-4"):
            pass
        thread = str(threading.get_ident()).encode()
        assert os.read(read_fd, 4096) == mark(b"+" + thread + b" req-2") + mark(b"-" + thread) + mark(
            b"+" + thread + b" req-3"
        )
        with pytest.raises(OSError):  # the marks' write end was closed by stop_marks
            os.fstat(write_fd)
    finally:
        nativelog.stop_marks()
        os.close(read_fd)


def test_a_relay_that_fails_says_so_and_stops_the_marks(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, NATIVE_LOGGER)
    read_fd, write_fd = os.pipe()
    marks_read, marks_write = os.pipe()
    nativelog.start_marks(marks_write)
    relay = Relay(read_fd)

    def broken(chunk: bytes, *, end: bool = False) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(relay, "feed", broken)
    os.write(write_fd, b"a line\n")
    relay.run()
    os.close(write_fd)
    os.close(marks_read)
    stopped = [r for r in _native(caplog) if getattr(r, "fields", {}).get("event") == "native_relay_stopped"]
    assert len(stopped) == 1
    assert stopped[0].levelno == logging.ERROR
    assert nativelog._mark_fd is None  # jobs no longer write marks nobody reads
