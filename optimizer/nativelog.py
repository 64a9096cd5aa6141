"""What C libraries write to file descriptor 2, passed on as JSON log records at a bounded rate.

libtiff and libjpeg write a line to fd 2 for each problem they meet in a file, and a client chooses the
file: a 24 KB TIFF with 2000 private tags of an invalid type made 3999 lines (1 MB of log, 42 times the
upload) on every request, and the corpus's 4.9 KB TIFF without dimensions makes 197. The relay lets a
burst of ``LINE_BURST`` lines through, then ``LINES_PER_SECOND``, and counts the rest: at most once every
``SUMMARY_SECONDS`` one record says how many were left out (``"event": "native_suppressed"``). So what a
library says about an ordinary bad file is still there whole, and no client can fill the disk.

Which request made a library speak: the library writes from a worker thread with no request in sight,
so each job in the pool writes a mark into the same pipe as it starts and as it ends (``attributed``),
and the relay gives each line the ids of the requests whose jobs were running while it arrived, in
``request_ids`` (``"event": "native"``; a line written outside any job has none). Writes to a pipe of
up to ``PIPE_BUF`` bytes are never split, and the pipe keeps the order of writes, so a line written
inside a job's marks is read inside them; with several workers the ids of the others running at the
time come along. A mark carries a token drawn at start-up, so that a file whose bytes end up in a
library's message cannot forge one. Marks are only written while a relay reads the pipe
(``start_marks``): embedded in another application, fd 2 is the host's and nothing is written to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterator

# A bad file's whole story fits (a truncated JPEG: 1-2 lines; a broken TIFF: a few dozen, cut here).
LINE_BURST = 20
# Sustained lines let through once the burst is spent.
LINES_PER_SECOND = 1.0
# The longest a count of left-out lines waits before it is logged.
SUMMARY_SECONDS = 10.0
# Silence after a left-out line before its count is logged, so that one burst is counted once.
QUIET_SECONDS = 0.5
# A line is cut to this many characters: a library printing a file's bytes cannot make one huge record.
MAX_LINE_CHARS = 2000
READ_BYTES = 65536

NATIVE_LOGGER = "optimizer.native"

# A mark: START, the token, "+" or "-", the thread's id, for "+" a space and the request id, END. The
# token is secret: bytes of a file that a library quotes cannot make a mark, whatever they hold.
_START, _END = b"\x1e", b"\x1f"
_token = secrets.token_hex(8).encode()
# Marks go through a descriptor of their own onto the relay's pipe, never through fd 2 itself: once
# stop_marks() has closed it, no mark can be written anywhere, even by a job still running at exit
# after fd 2 went back to the real stderr (found in review). The lock makes closing wait for a write.
_mark_lock = threading.Lock()
_mark_fd: int | None = None


def start_marks(pipe_fd: int) -> None:
    """From now on jobs mark their start and end on ``pipe_fd`` (the relay's pipe; taken over)."""
    global _mark_fd  # noqa: PLW0603 - one relay per process
    with _mark_lock:
        _mark_fd = pipe_fd


def stop_marks() -> None:
    """No more marks: before fd 2 goes back to the real stderr, or when the relay stops reading."""
    global _mark_fd  # noqa: PLW0603 - one relay per process
    with _mark_lock:
        if _mark_fd is not None:
            os.close(_mark_fd)
            _mark_fd = None


@contextlib.contextmanager
def attributed(request_id: str) -> Iterator[None]:
    """Around one job in a worker thread: what libraries write meanwhile is logged with ``request_id``."""
    if _mark_fd is None:
        yield
        return
    thread = str(threading.get_ident()).encode()
    _mark(b"+" + thread + b" " + request_id.encode("ascii", "replace")[:MAX_ID_BYTES])
    try:
        yield
    finally:
        _mark(b"-" + thread)


# Request ids are at most 128 characters (optimizer.observe); a mark stays far below PIPE_BUF (4096).
MAX_ID_BYTES = 128
MAX_MARK_BYTES = 1 + 16 + 1 + 24 + 1 + MAX_ID_BYTES + 1


def _mark(body: bytes) -> None:
    with _mark_lock:
        if _mark_fd is not None:
            with contextlib.suppress(OSError):  # the relay closed its end: nothing reads marks any more
                os.write(_mark_fd, _START + _token + body + _END)


class LineBudget:
    """A token bucket over lines, counting the lines it refuses."""

    def __init__(
        self,
        burst: int = LINE_BURST,
        per_second: float = LINES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(burst)
        self._per_second = per_second
        self._clock = clock
        self._tokens = float(burst)
        self._refilled = clock()
        self.dropped = 0

    def take(self) -> bool:
        """Whether one more line may be logged now; if not, it is counted in ``dropped``."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._per_second)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        return False


class Relay:
    """Reads the pipe behind fd 2 and logs its lines through ``LineBudget``. ``run`` returns at end of
    file, when the last write end is closed, after logging what is left."""

    def __init__(
        self,
        read_fd: int,
        logger: logging.Logger | None = None,
        budget: LineBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fd = read_fd
        self._log = logger or logging.getLogger(NATIVE_LOGGER)
        self._budget = budget or LineBudget(clock=clock)
        self._clock = clock
        # When the last count of left-out lines was logged: never, so the first may be logged at once.
        self._summarised = clock() - SUMMARY_SECONDS
        self._first_dropped = 0.0  # when the first line of the current count was left out
        self._last_line = 0.0  # when the last line arrived, logged or left out
        self._unparsed = b""  # the beginning of a mark whose end has not been read yet
        self._running: dict[bytes, str] = {}  # thread -> the request its job is for, from the marks
        self._line = bytearray()  # the line being read
        self._line_ids: set[str] = set()  # the requests running while its bytes arrived

    def run(self) -> None:
        try:
            while True:
                if select.select([self._fd], [], [], self._timeout())[0]:
                    chunk = os.read(self._fd, READ_BYTES)
                    if not chunk:
                        break
                    self.feed(chunk)
                # Quiet is measured in lines: the jobs' marks keep the pipe busy under steady traffic.
                if self._budget.dropped and self._clock() >= self._summary_due():
                    self._summarise(force=True)
            self.feed(b"", end=True)
            self._summarise(force=True)
        except Exception:
            # Logged through the service's handler, which writes to the real stderr, not to this pipe.
            self._log.exception(
                "the relay of C libraries' stderr stopped: what they write is lost from now on",
                extra={"fields": {"event": "native_relay_stopped"}},
            )
        finally:
            # The read end first: a job blocked writing a mark into a full pipe gets EPIPE and lets go of
            # the lock that stop_marks() takes.
            os.close(self._fd)
            stop_marks()

    def feed(self, chunk: bytes, *, end: bool = False) -> None:
        """What was read from the pipe: marks are taken out, lines logged."""
        data, self._unparsed = self._unparsed + chunk, b""
        at = 0
        while True:
            start = data.find(_START, at)
            if start < 0:
                self._text(data[at:])
                break
            self._text(data[at:start])
            stop = data.find(_END, start)
            if data.startswith(_START + _token, start) and stop >= 0:
                self._mark(data[start + 1 + len(_token) : stop])
                at = stop + 1
            elif (
                not end
                and (_START + _token).startswith(data[start : start + 1 + len(_token)])
                and (len(data) - start <= MAX_MARK_BYTES)
            ):
                self._unparsed = data[start:]  # a mark's beginning: its end is in the next read
                break
            else:  # the character in a library's own output
                self._text(data[start : start + 1])
                at = start + 1
        if end and self._line:
            self._emit()

    def _mark(self, body: bytes) -> None:
        kind = body[:1]
        thread, _, request = body[1:].partition(b" ")
        if kind == b"+":
            self._running[thread] = request.decode("ascii", "replace")
        elif kind == b"-":
            self._running.pop(thread, None)

    def _text(self, text: bytes) -> None:
        if not text:
            return
        *ended, rest = text.split(b"\n")
        running = self._running.values()
        for piece in ended:
            self._line += piece
            self._line_ids.update(running)
            self._emit()
        if rest:
            self._line += rest
            self._line_ids.update(running)
            if len(self._line) > MAX_LINE_CHARS * 4:  # no end of line in sight: a line of its own
                self._emit()

    def _emit(self) -> None:
        raw, ids = bytes(self._line), self._line_ids
        self._line, self._line_ids = bytearray(), set()
        self.line(raw, ids)

    def line(self, raw: bytes, request_ids: set[str] | frozenset[str] = frozenset()) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if not text.strip():
            return
        self._last_line = self._clock()
        self._summarise(force=False)
        if not self._budget.take():
            if self._budget.dropped == 1:
                self._first_dropped = self._clock()
            return
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + f"... ({len(text) - MAX_LINE_CHARS} more characters)"
        fields: dict[str, object] = {"event": "native"}
        if request_ids:
            fields["request_ids"] = sorted(request_ids)
        self._log.warning("%s", text, extra={"fields": fields})

    def _summary_due(self) -> float:
        """When a count of left-out lines is logged if no line comes first: QUIET_SECONDS after the last
        line, and no sooner than SUMMARY_SECONDS after the last count."""
        return max(self._last_line + QUIET_SECONDS, self._summarised + SUMMARY_SECONDS)

    def _timeout(self) -> float | None:
        """Sleep for ever unless a count of left-out lines is waiting to be logged."""
        if not self._budget.dropped:
            return None
        return max(0.0, self._summary_due() - self._clock())

    def _summarise(self, *, force: bool) -> None:
        dropped = self._budget.dropped
        now = self._clock()
        # Under a steady flood the count goes out every SUMMARY_SECONDS; one that went quiet gets its
        # count after QUIET_SECONDS (``_timeout``).
        if not dropped or (not force and now - self._first_dropped < SUMMARY_SECONDS):
            return
        self._budget.dropped = 0
        self._log.warning(
            "%d more lines from native libraries were not logged over %.1f s (at most %d at once, "
            "then %g a second)",
            dropped,
            now - self._first_dropped,
            LINE_BURST,
            LINES_PER_SECOND,
            extra={"fields": {"event": "native_suppressed", "suppressed": dropped}},
        )
        self._summarised = now
