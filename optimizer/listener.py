"""The standalone server's listening sockets: accept connections, and pace them while the gate is full.

Under a flood of clients that retry a 503 at once (the Go service's k6 test), every new connection is a
refusal, and the event loop is runnable all the time: whatever CPU the scheduler gives it goes to
accepting, parsing and refusing, and the admitted uploads wait between two of its reads. asyncio's own
server accepts up to 100 connections each time the listening socket is readable. Here, while every
admission slot is taken and more than a burst of ``ACCEPT_BURST`` has come in, one connection is
accepted every ``ACCEPT_PACE_SECONDS`` and the others wait in the kernel's accept queue, where they
cost no CPU (only the first ~100 KB of each upload, in kernel buffers). As soon as the gate has room
the queue is drained at once, as before, and beyond ``MAX_QUEUED_WHILE_PACING`` waiting the excess is
accepted at once, so that no connection waits more than ~0.5 s (under the Kubernetes probes' 1 s
timeout, however many clients flood). Each accepted connection is still answered at once (503 with
``Retry-After`` when still full): the gate fails fast, the listener only stops fetching refusals
faster than it can afford them.

Measured on the flood (docs/benchmarks.md, three alternating pairs): 18.8-20.4 -> 21.5-21.7 images/s,
refusals 297-332 -> 180-190/s, the upload read 102-109 -> 51-59 ms, the harness 0.22-0.27 -> 0.15-0.17
cores; S1 and S2 with clients that honour ``Retry-After`` unchanged (they open far fewer than 100
connections a second).

Only for ``optimizer.server``: an application that embeds the service keeps its own listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web

from optimizer.badrequests import ProblemRequestHandler, problem_handlers

log = logging.getLogger("optimizer")

# One new connection per 10 ms while the gate is full: at most 100 refusals a second from new
# connections. In a prototype, 5 ms served the flood 4-8 % better than no pacing, 10 ms 11-18 %.
ACCEPT_PACE_SECONDS = 0.01
# Connections accepted while the gate is full before the pace applies, refilled at the pace's rate.
# Clients that honour Retry-After return in clusters (~24 refusals a second on S1, told the same whole
# seconds): paced one by one, the last of a cluster waited in the accept queue and S1's p95 rose from
# 0.27-0.30 to 0.31-0.39 s. A flood empties the allowance within a fraction of a second.
ACCEPT_BURST = 20
# After an accept error such as EMFILE (out of descriptors): wait instead of spinning on it.
ACCEPT_ERROR_PAUSE_SECONDS = 0.1
# At most this many connections accepted in one go when the gate has room (asyncio's own figure).
ACCEPT_BATCH = 100
# While pacing, a connection waits its place in the accept queue times the pace. Beyond this many
# queued, the excess is accepted at once, so that none waits much more than 0.5 s: a health probe may
# be among them (Kubernetes' readiness timeout is 1 s). The k6 flood keeps up to 44 waiting; a cap of
# 30 cut its gain from pacing by about half (docs/benchmarks.md).
MAX_QUEUED_WHILE_PACING = 50
# accept() errors that mean the process or the system is out of a resource: wait before trying again.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# At most one warning about them per this many seconds.
_WARN_EVERY_SECONDS = 5.0
# Out of descriptors, at least this many connections waiting for a request are closed to make room, or a
# tenth of them if more (see ``PacedServer._shed_waiting``).
SHED_AT_LEAST = 16
# struct tcp_info (linux/tcp.h): for a listening socket, tcpi_unacked is the accept queue's length.
_TCP_INFO_SIZE = 104
_TCPI_UNACKED_OFFSET = 24


class TokenBucket:
    """``rate`` tokens a second, at most ``size`` kept: ``take()`` says whether one was there."""

    def __init__(self, rate: float, size: int) -> None:
        self._rate = rate
        self._size = float(size)
        self._tokens = float(size)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self._size, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


async def _pause(seconds: float) -> None:
    """The accept loops' waits (a function of its own so that tests can count them)."""
    await asyncio.sleep(seconds)


class PacedServer(asyncio.AbstractServer):
    """Listening sockets with their accept loops; ``full`` says when to pace."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        full: Callable[[], bool],
    ) -> None:
        self._sockets = sockets
        self._factory = protocol_factory
        self._full = full
        self._loop = asyncio.get_running_loop()
        self._opening: set[asyncio.Task[Any]] = set()
        self._connections: weakref.WeakSet[ProblemRequestHandler] = weakref.WeakSet()
        self._warned_at = -_WARN_EVERY_SECONDS
        self._shed_logged_at = -_WARN_EVERY_SECONDS
        self._shed_unlogged = 0  # connections closed since the last connections_shed line
        self._burst = TokenBucket(1 / ACCEPT_PACE_SECONDS, ACCEPT_BURST)
        self._accepting = [self._loop.create_task(self._accept_forever(sock)) for sock in sockets]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(not task.done() for task in self._accepting)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; connections already open carry on."""
        for task in self._accepting:
            task.cancel()
        for sock in self._sockets:
            if sock.fileno() >= 0:
                # Before the close: a pending sock_accept's reader must not outlive its descriptor.
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)

    async def start_serving(self) -> None:
        """Nothing to do: the accept loops start with the server."""

    async def serve_forever(self) -> None:
        await self.wait_closed()

    async def _accept_forever(self, sock: socket.socket) -> None:
        loop = self._loop
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._out_of_resources(exc)
                    await _pause(ACCEPT_ERROR_PAUSE_SECONDS)
                else:  # the client left before it was accepted, and the like: next one
                    log.debug("accept failed: %s", exc)
                continue
            self._open(conn)
            more = ACCEPT_BATCH - 1
            if self._full():
                if self._burst.take(loop.time()):
                    continue  # within the burst allowance: the next one without a pause
                waiting = queued_connections(sock)
                if waiting is not None and waiting <= MAX_QUEUED_WHILE_PACING:
                    await _pause(ACCEPT_PACE_SECONDS)
                    continue
                # Too many waiting (or no way to tell): the excess now, paced again from the next turn.
                if waiting is not None:
                    more = min(more, waiting - MAX_QUEUED_WHILE_PACING)
            for _ in range(more):  # the rest of the queue, as asyncio's server does
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRNOS:
                        self._out_of_resources(exc)
                        break
                    log.debug("accept failed: %s", exc)
                    continue
                self._open(conn)

    def _open(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            _transport, protocol = await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as exc:  # the client left before its transport was made, and the like
            log.debug("could not open an accepted connection: %s", exc)
            conn.close()
            return
        if isinstance(protocol, ProblemRequestHandler):
            self._connections.add(protocol)

    def _out_of_resources(self, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            self._shed_waiting()
        now = self._loop.time()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning(
                "cannot accept connections: %s; trying again every %.1f s",
                exc,
                ACCEPT_ERROR_PAUSE_SECONDS,
                extra={"fields": {"event": "accept_failed", "error": str(exc)}},
            )

    def _shed_waiting(self) -> None:
        """Out of descriptors: close the connections that have waited longest for a request (idle
        between requests, or sending a head too slowly), as nginx reuses its keep-alive connections
        when it runs out. Without this, connections that send nothing, or an unfinished head behind a
        whole request, which no deadline covers (``optimizer.badrequests``), could hold every descriptor
        until aiohttp's idle timeout, an hour, and no new client would be accepted (found in review)."""
        waiting = [
            (since, handler)
            for handler in self._connections
            if (since := handler.waiting_since()) is not None
        ]
        if not waiting:
            return
        waiting.sort(key=lambda pair: pair[0])
        shed = waiting[: max(SHED_AT_LEAST, len(waiting) // 10)]
        for _since, handler in shed:
            handler.force_close()
        # One line every few seconds however often it sheds (every accept failure, 0.1 s apart).
        self._shed_unlogged += len(shed)
        now = self._loop.time()
        if now - self._shed_logged_at < _WARN_EVERY_SECONDS:
            return
        log.warning(
            "out of file descriptors: closed %d connections waiting for a request (the longest for %.0f s) "
            "to accept new ones; %d were waiting",
            self._shed_unlogged,
            now - shed[0][0],
            len(waiting),
            extra={
                "fields": {
                    "event": "connections_shed",
                    "closed": self._shed_unlogged,
                    "waiting": len(waiting),
                }
            },
        )
        self._shed_logged_at = now
        self._shed_unlogged = 0


def queued_connections(sock: socket.socket) -> int | None:
    """How many connections wait in ``sock``'s accept queue, or ``None`` where it cannot be read
    (Linux tells it in a listening socket's ``tcp_info``)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (AttributeError, OSError):
        return None
    if len(info) < _TCPI_UNACKED_OFFSET + 4:
        return None
    waiting: int = struct.unpack_from("=I", info, _TCPI_UNACKED_OFFSET)[0]
    return waiting


class PacedSite(web.BaseSite):
    """``web.TCPSite`` with a ``PacedServer`` in place of asyncio's server. ``refused`` is told of
    each request aiohttp's parser refused, and of each head that came too late (``head_timeout``;
    ``optimizer.badrequests``)."""

    __slots__ = ("_full", "_head_timeout", "_host", "_port", "_refused", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        reuse_port: bool,
        full: Callable[[], bool],
        refused: Callable[[web.StreamResponse], None] | None = None,
        head_timeout: float | None = None,
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._full = full
        self._refused = refused
        self._head_timeout = head_timeout

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = PacedServer(
            listening_sockets(self._host, self._port, self._reuse_port),
            problem_handlers(server, self._refused, self._head_timeout),
            self._full,
        )


def listening_sockets(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` names, as asyncio's
    ``create_server`` makes them (SO_REUSEADDR; an IPv6 socket IPv6-only beside an IPv4 one). An IPv6
    socket alone takes IPv4 clients too: ``::`` listens on both stacks, as Go's and Node's servers do
    (it was IPv6-only, so the container's health check on 127.0.0.1 failed, found in review)."""
    infos = list(
        dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    )
    both = {info[0] for info in infos} >= {socket.AF_INET, socket.AF_INET6}
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if both else 0)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return sockets
