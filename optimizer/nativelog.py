"""What C libraries write to file descriptor 2, passed on as JSON log records at a bounded rate.

libtiff and libjpeg write a line to fd 2 for each problem they meet in a file, and a client chooses the
file: a 24 KB TIFF with 2000 private tags of an invalid type made 3999 lines (1 MB of log, 42 times the
upload) on every request, and the corpus's 4.9 KB TIFF without dimensions makes 197. The relay lets a
burst of ``LINE_BURST`` lines through, then ``LINES_PER_SECOND``, and counts the rest: at most once every
``SUMMARY_SECONDS`` one record says how many were left out (``"event": "native_suppressed"``). So what a
library says about an ordinary bad file is still there whole, and no client can fill the disk.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable

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

    def run(self) -> None:
        pending = b""
        while True:
            if not select.select([self._fd], [], [], self._timeout())[0]:
                self._summarise(force=True)  # quiet since lines were left out: say so now
                continue
            chunk = os.read(self._fd, READ_BYTES)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > MAX_LINE_CHARS * 4:  # no end of line in sight: a line of its own
                lines.append(pending)
                pending = b""
            for line in lines:
                self.line(line)
        if pending:
            self.line(pending)
        self._summarise(force=True)
        os.close(self._fd)

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if not text.strip():
            return
        self._summarise(force=False)
        if not self._budget.take():
            if self._budget.dropped == 1:
                self._first_dropped = self._clock()
            return
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS] + f"... ({len(text) - MAX_LINE_CHARS} more characters)"
        self._log.warning("%s", text)

    def _timeout(self) -> float | None:
        """Sleep for ever unless a count of left-out lines is waiting to be logged."""
        if not self._budget.dropped:
            return None
        return max(QUIET_SECONDS, self._summarised + SUMMARY_SECONDS - self._clock())

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
