"""Refused uploads: answer at once, never read the rest of the body, close the connection a little later.

aiohttp would read and discard the rest of a refused body ("lingering") to keep the connection usable:
~1.5 ms of event loop CPU per refused 2.5 MB upload, which under a flood of clients retrying at once
starves the requests being served. Instead the socket is no longer read (the client's upload stalls on
TCP flow control), the answer says ``Connection: close``, and the socket is closed ``seconds`` later.
Clients that read the answer while they send (Go's net/http, aiohttp, curl) see the 503 or 413 at once
and hang up themselves; one whose small upload fits in the socket buffers reads it after sending.

**Bounded.** Until it is closed, each such connection keeps in the kernel what its client sent before
it was refused: ~170 KB on average under the original k6 flood (50 clients retrying at once), where
~340 refusals a second, each kept 2 s, held 130-176 MB of socket receive buffers. That memory is outside
the process's RSS but inside its container's memory limit (cgroup socket accounting). So once ``limit``
connections linger, a newer refusal closes the oldest early, but only one whose answer has been handed
to the socket (an application embedding this one may await between the handler and the write) and
acknowledged by the client's kernel: the close sends a reset (the upload is unread), and the kernel then
drops what it has not yet delivered, so a lost segment of the 503 could not be sent again. Linux says
how much of a TCP socket's output is unacknowledged (``SIOCOUTQ``); elsewhere ``min_age`` seconds must
pass after the answer is seen written. A Linux client can still read what it received after the reset
(other stacks were not checked); and a client whose upload is larger than the buffers could not have
read the answer after sending anyway: its send stalls until the close. Connections that are not ready go
to the back, so a few clients that never acknowledge cannot switch the bound off; those close on their
own timer.

Behind TLS (an application embedding this one may serve it), pausing the transport pauses only the TLS
layer: asyncio goes on reading the raw socket into the process, up to ~256 KiB a connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

# At most this many refused connections wait to be closed (per application, so per server process).
# Measured on the k6 flood (docs/benchmarks.md): unbounded, ~700 of them held 130-176 MB of socket
# buffers, and with the clients' own unsent uploads the machine's TCP memory passed the kernel's pressure
# mark, where it prunes receive queues and every connection slows down: 15.7-19.2 images/s (mean 17.7).
# With 64: 14-32 MB, no pressure, 17.5-20.3 images/s (mean 19.4); 16 and 256 measured the same. Polite
# clients (~23 refusals/s on S1) stay below it for the 2 s.
MAX_LINGERING = 64
# Where the kernel cannot say whether the answer was acknowledged: no connection is closed early before
# this long after its answer was written, longer than Linux's minimum retransmission timeout (0.2 s), so
# that a lost segment is sent again first.
MIN_LINGER_SECONDS = 0.5
# Connections looked at per refusal, oldest first; those not ready go to the back. Clients that never
# acknowledge (their own timers close them) cost at most this many checks per refusal.
_LOOK_AT = 16

if sys.platform == "linux":
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ  # the same request number for sockets: bytes not yet acked
else:
    _SIOCOUTQ = None


def unacknowledged(transport: asyncio.BaseTransport) -> int | None:
    """Bytes written to ``transport`` over TCP that its peer has not acknowledged, asyncio's own buffer
    included; ``None`` where the kernel cannot be asked (not Linux, not TCP, no socket any more)."""
    if _SIOCOUTQ is None:
        return None
    try:
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None  # on a Unix socket SIOCOUTQ counts what the peer has not *read*
        raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
        pending: int = struct.unpack("i", raw)[0]
        pending += transport.get_write_buffer_size()  # type: ignore[attr-defined]
    except Exception:  # a closed socket (fileno -1), or a TLS transport closed twice (3.11-3.13)
        return None
    return pending


@dataclass(slots=True)
class _Waiting:
    timer: asyncio.TimerHandle
    writer: AbstractStreamWriter | None
    written_before: int
    answered_at: float | None = None  # when the answer was first seen written (for ``min_age``)

    def answered(self) -> bool:
        """Whether the answer has been handed to the transport (the writer's output grew since)."""
        return self.writer is None or self.writer.output_size > self.written_before


class Lingering:
    """The refused connections waiting to be closed: each for ``seconds`` at most, and no more than
    ``limit`` of them once their answers have arrived."""

    def __init__(
        self, seconds: float, limit: int = MAX_LINGERING, min_age: float = MIN_LINGER_SECONDS
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.seconds = seconds
        self.limit = limit
        self.min_age = min_age
        self._open: OrderedDict[asyncio.BaseTransport, _Waiting] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, transport: asyncio.BaseTransport, writer: AbstractStreamWriter | None = None) -> None:
        """Close ``transport`` ``seconds`` from now, or sooner once ``limit`` newer ones wait.
        ``writer`` is the request's, whose output shows when the answer has been written."""
        if transport in self._open:
            return
        loop = asyncio.get_running_loop()
        self._close_oldest(loop.time())
        timer = loop.call_later(self.seconds, self._close, transport)
        written = writer.output_size if writer is not None else 0
        self._open[transport] = _Waiting(timer, writer, written)

    def _close_oldest(self, now: float) -> None:
        """Make room for one more: forget the connections already closed (by their clients or by the
        host), and close the oldest whose answer has arrived. Those not ready yet go to the back, so that
        a few that never will (a client that does not acknowledge) do not hide the others."""
        excess = len(self._open) - self.limit + 1
        for _ in range(min(_LOOK_AT, len(self._open))):
            if excess <= 0:
                return
            transport, waiting = next(iter(self._open.items()))  # the oldest
            if transport.is_closing():
                self._open.pop(transport).timer.cancel()
                excess -= 1
            elif waiting.answered() and self._delivered(transport, waiting, now):
                self._open.pop(transport).timer.cancel()
                transport.close()
                excess -= 1
            else:
                self._open.move_to_end(transport)

    def _delivered(self, transport: asyncio.BaseTransport, waiting: _Waiting, now: float) -> bool:
        pending = unacknowledged(transport)
        if pending is not None:
            return pending == 0
        if waiting.answered_at is None:
            waiting.answered_at = now
        return now - waiting.answered_at >= self.min_age

    def _close(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)
        if not transport.is_closing():
            transport.close()


def stop_reading_unwanted_body(
    request: web.BaseRequest, response: web.StreamResponse, lingering: Lingering
) -> None:
    """Answer a refused upload without reading the rest of its body (see the module's docstring)."""
    if request.content.is_eof():
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    # Not response.force_close(): aiohttp would then close the socket right after the answer, and with
    # body bytes still unread the kernel sends a reset the client may see instead of the 503 (measured:
    # 120 connection errors in 25 s of S2). The header tells the client; ``lingering`` closes.
    response.headers["Connection"] = "close"
    request.content.feed_eof()
    # Drop what aiohttp had already buffered of the body (up to a few hundred KB): kept until the
    # socket closes, it added up to 1.6 GB under a flood of refused 2.5 MB uploads. Draining the buffer
    # makes aiohttp resume reading, so the transport is paused after it.
    if request.content.exception() is None:  # a failed stream (shutdown, reset) would re-raise here
        request.content.read_nowait()
    transport.pause_reading()
    lingering.add(transport, request.writer)
