"""Refused uploads: answer at once, never read the rest of the body, close the connection a little later.

aiohttp would read and discard the rest of a refused body ("lingering") to keep the connection usable:
~4 ms of event loop CPU per refused 2.5 MB upload, which under a flood of clients retrying at once
starves the requests being served. Instead the socket is no longer read (the client's upload stalls on
TCP flow control), the answer says ``Connection: close``, and the socket is closed ``seconds`` later.
Clients that read the answer while they send (Go's net/http, aiohttp, curl) see the 503 or 413 at once
and hang up themselves; one whose small upload fits in the socket buffers reads it after sending.

**Bounded.** Until it is closed, each such connection keeps in the kernel what its client sent before
it was refused: ~170 KB on average under the original k6 flood (50 clients retrying at once), where
~340 refusals a second, each kept 2 s, held 130-156 MB of socket receive buffers. That memory is outside
the process's RSS but inside its container's memory limit (cgroup socket accounting). So at most
``limit`` connections linger; a newer refusal closes the oldest early. Its answer was written long before
(a reset does not take back what the client's kernel has received: it can still read the 503), and a
client whose upload is larger than the buffers could not have read the answer after sending anyway:
its send stalls until the close.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from aiohttp import web

# At most this many refused connections wait to be closed (per application). Measured on the k6 flood
# (docs/benchmarks.md): unbounded, ~700 of them held 130-170 MB of socket buffers, and with the clients'
# own unsent uploads the machine's TCP memory passed the kernel's pressure mark, where it prunes receive
# queues and every connection slows down: 16-17.5 images/s. With 64: 17-36 MB, no pressure, 19-20 images/s
# (16 and 256 measured the same). Polite clients (~23 refusals/s on S1) stay below it for the 2 s.
MAX_LINGERING = 64


class Lingering:
    """The refused connections waiting to be closed: each for ``seconds`` at most, ``limit`` at most."""

    def __init__(self, seconds: float, limit: int = MAX_LINGERING) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.seconds = seconds
        self.limit = limit
        self._open: OrderedDict[asyncio.BaseTransport, asyncio.TimerHandle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, transport: asyncio.BaseTransport) -> None:
        """Close ``transport`` ``seconds`` from now, or sooner when ``limit`` newer ones are waiting."""
        if transport in self._open:
            return
        while len(self._open) >= self.limit:
            oldest, timer = self._open.popitem(last=False)
            timer.cancel()
            oldest.close()  # asyncio still sends what is buffered for writing, then closes
        timer = asyncio.get_running_loop().call_later(self.seconds, self._close, transport)
        self._open[transport] = timer

    def _close(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)
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
    lingering.add(transport)
