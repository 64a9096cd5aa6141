"""``optimizer.listener``: the standalone server's accept loop, paced while the gate is full."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from optimizer import listener
from optimizer.badrequests import PROBLEM_CODE
from optimizer.listener import ACCEPT_BURST, ACCEPT_PACE_SECONDS, PacedSite, TokenBucket, listening_sockets


class Gate:
    """Stands in for ``AdmissionGate.full``; also keeps the problems the site reports refused."""

    def __init__(self) -> None:
        self.full = False
        self.refused: list[web.StreamResponse] = []


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


@pytest.fixture
async def served(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, Gate, list[float]]]:
    """A runner with a ``PacedSite`` on a free port; the pauses it takes are recorded, not slept."""
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)
        await asyncio.sleep(0)

    monkeypatch.setattr(listener, "_pause", pause)
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    gate = Gate()
    site = PacedSite(
        runner, "127.0.0.1", 0, reuse_port=False, full=lambda: gate.full, refused=gate.refused.append
    )
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/", gate, pauses
    finally:
        await runner.cleanup()


async def get_on_new_connections(url: str, count: int) -> list[str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

        async def one() -> str:
            async with session.get(url) as response:
                return await response.text()

        return await asyncio.gather(*(one() for _ in range(count)))


async def test_connections_are_accepted_without_pauses_while_the_gate_has_room(
    served: tuple[str, Gate, list[float]],
) -> None:
    url, _gate, pauses = served
    assert await get_on_new_connections(url, 20) == ["hello"] * 20
    assert pauses == []


async def test_while_the_gate_is_full_each_new_connection_is_followed_by_a_pause(
    served: tuple[str, Gate, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every connection is still accepted and answered (the gate answers 503 at once, elsewhere); the
    # listener only takes them one per pause instead of all that wait.
    url, gate, pauses = served
    # The allowance refills as time passes: on a slow or busy machine the connections took over 0.1 s
    # to arrive, and the refill spared them their pauses. The bucket's clock stands still here.
    take = TokenBucket.take
    monkeypatch.setattr(TokenBucket, "take", lambda bucket, _now: take(bucket, 0.0))
    gate.full = True
    count = ACCEPT_BURST + 10
    assert await get_on_new_connections(url, count) == ["hello"] * count
    # The first ACCEPT_BURST go without a pause.
    assert pauses.count(ACCEPT_PACE_SECONDS) >= count - ACCEPT_BURST - 1
    gate.full = False
    pauses.clear()
    assert await get_on_new_connections(url, 5) == ["hello"] * 5
    assert pauses == []


async def test_a_site_stopped_refuses_new_connections() -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = PacedSite(runner, "127.0.0.1", 0, reuse_port=False, full=lambda: False)
    await site.start()
    port = runner.addresses[0][1]
    assert await get_on_new_connections(f"http://127.0.0.1:{port}/", 3) == ["hello"] * 3
    await site.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    await runner.cleanup()


def test_listening_sockets_cover_every_address_and_close_them_all_on_failure() -> None:
    descriptors = Path("/proc/self/fd")
    sockets = listening_sockets("127.0.0.1", 0, reuse_port=True)
    try:
        assert [sock.family for sock in sockets] == [socket.AF_INET]
        assert sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert not sockets[0].getblocking()
        port = sockets[0].getsockname()[1]
        # The port is taken (and SO_REUSEPORT is not asked for): binding again fails, and nothing of
        # the failed attempt stays open.
        before = len(list(descriptors.iterdir())) if descriptors.is_dir() else 0
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port, reuse_port=False)
        if descriptors.is_dir():
            assert len(list(descriptors.iterdir())) == before
    finally:
        for sock in sockets:
            sock.close()


def test_an_ipv6_socket_alone_takes_ipv4_clients_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """``::`` was IPv6-only, so a container listening there failed its health check on 127.0.0.1
    (found in review). An IPv6 socket is IPv6-only only beside an IPv4 one for the same host (as asyncio
    makes them), where both would otherwise claim the IPv4 port. Tests bind nothing wider than loopback,
    and Linux makes a socket bound to ``::1`` IPv6-only whatever it was told, so the option is read as
    it is set."""
    told: dict[int, int] = {}

    class Recording(socket.socket):
        def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
            if (level, option) == (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                told[self.fileno()] = value
            super().setsockopt(level, option, value, *rest)

    monkeypatch.setattr(socket, "socket", Recording)  # the module the listener makes its sockets with
    for host, expected in (("::1", 0), ("localhost", 1)):
        told.clear()
        families = {info[0] for info in socket.getaddrinfo(host, 0)}
        if expected and not families >= {socket.AF_INET, socket.AF_INET6}:
            continue  # this machine's localhost is not both
        sockets = listening_sockets(host, 0, reuse_port=False)
        try:
            assert list(told.values()) == [expected]
        finally:
            for sock in sockets:
                sock.close()


async def test_a_long_accept_queue_is_accepted_at_once_even_while_the_gate_is_full(
    served: tuple[str, Gate, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Beyond MAX_QUEUED_WHILE_PACING waiting, pacing would keep a connection (a health probe among
    # them) waiting too long: the excess is accepted without a pause.
    url, gate, pauses = served
    gate.full = True
    monkeypatch.setattr(listener, "queued_connections", lambda sock: listener.MAX_QUEUED_WHILE_PACING + 50)
    assert await get_on_new_connections(url, 10) == ["hello"] * 10
    assert pauses == []


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the accept queue's length is read from Linux's tcp_info"
)
def test_the_accept_queue_length_is_read_from_the_kernel() -> None:
    (sock,) = listening_sockets("127.0.0.1", 0, reuse_port=False)
    clients: list[socket.socket] = []
    try:
        assert listener.queued_connections(sock) == 0
        port = sock.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for _ in range(500):  # the last ACK of each handshake is queued at once on loopback, but wait
            if listener.queued_connections(sock) == 3:
                break
            time.sleep(0.01)
        assert listener.queued_connections(sock) == 3  # handshakes done, none accepted yet
    finally:
        for client in clients:
            client.close()
        sock.close()


def test_the_burst_allowance_refills_at_the_pace() -> None:
    bucket = TokenBucket(rate=100, size=3)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(10.005)  # half a token back
    assert bucket.take(10.015)  # one and a half since: one taken
    assert [bucket.take(20.0) for _ in range(4)] == [True, True, True, False]  # never more than 3 kept


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Encoding: br\r\nContent-Length: 5\r\n\r\nhello", id="br"
        ),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", id="long-header"),
        pytest.param(b"hello there\r\n\r\n", id="not-http"),
    ],
)
async def test_a_request_the_parser_refuses_gets_a_problem_body(
    served: tuple[str, Gate, list[float]], raw: bytes
) -> None:
    # aiohttp answers these itself, before any middleware, in plain text; the standalone server's
    # connections answer them as every other 4xx, close, and tell the service (its metrics count them).
    url, gate, _pauses = served
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the close
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400"
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["code"] == "bad_request"
    assert problem["status"] == 400
    assert problem["detail"].startswith("the request cannot be parsed")
    assert len(problem["detail"]) <= 300
    assert [refused.status for refused in gate.refused] == [400]


async def test_a_problem_the_client_never_got_is_not_counted(
    served: tuple[str, Gate, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that resets the connection before its 400 goes out was answered nothing: the metrics
    # must not count it as answered (found in review). aiohttp reports that as ``reset``.
    async def client_gone(
        _handler: RequestHandler, _request: web.BaseRequest, resp: web.StreamResponse, _start: float | None
    ) -> tuple[web.StreamResponse, bool]:
        return resp, True

    monkeypatch.setattr(RequestHandler, "finish_response", client_gone)
    url, gate, _pauses = served
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"hello there\r\n\r\n")
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed, unanswered
    finally:
        writer.close()
    assert gate.refused == []


HEAD_TIMEOUT = 0.5


@contextlib.asynccontextmanager
async def connected(host: str, port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def echo_length(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


@pytest.fixture
async def deadline_site() -> AsyncIterator[tuple[str, int, Gate]]:
    """A ``PacedSite`` whose connections must send each request head within ``HEAD_TIMEOUT``."""
    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/", echo_length)
    runner = web.AppRunner(app)
    await runner.setup()
    gate = Gate()
    site = PacedSite(
        runner,
        "127.0.0.1",
        0,
        reuse_port=False,
        full=lambda: gate.full,
        refused=gate.refused.append,
        head_timeout=HEAD_TIMEOUT,
    )
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port, gate
    finally:
        await runner.cleanup()


async def test_a_head_left_unfinished_gets_408_and_the_connection_closes(
    deadline_site: tuple[str, int, Gate], caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a client sending a header byte now and then held its connection for an hour. The
    408 has no request and so no access line: a line of its own names the client (the next review)."""
    host, port, gate = deadline_site
    async with connected(host, port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
        with caplog.at_level(logging.INFO, logger="optimizer"):
            async with asyncio.timeout(10):
                answer = await reader.read()  # to the close
    (line,) = [
        record for record in caplog.records if getattr(record, "fields", {}).get("event") == "head_timeout"
    ]
    assert line.__dict__["fields"]["client"] == "127.0.0.1"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in head
    assert json.loads(body)["code"] == "upload_stalled"
    assert [(refused.status, refused.get(PROBLEM_CODE)) for refused in gate.refused] == [
        (408, "upload_stalled")
    ]


async def test_a_connection_that_sends_nothing_is_closed_unanswered(
    deadline_site: tuple[str, int, Gate],
) -> None:
    host, port, gate = deadline_site
    async with connected(host, port) as (reader, _writer):
        async with asyncio.timeout(10):
            assert await reader.read() == b""
    assert gate.refused == []


async def test_idle_keep_alive_and_a_slow_body_are_not_the_heads_deadline(
    deadline_site: tuple[str, int, Gate],
) -> None:
    """Between requests the connection may sit idle (aiohttp's idle timeout applies), and a body takes
    as long as the service's own deadlines allow."""
    host, port, gate = deadline_site
    async with connected(host, port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"hello")).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(HEAD_TIMEOUT * 3)  # idle between requests
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nabc")
        await asyncio.sleep(HEAD_TIMEOUT * 3)  # the head is whole; the body is slow
        writer.write(b"def")
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(1) == b"6"
    assert gate.refused == []


async def test_a_head_begun_after_idle_time_has_its_own_deadline(
    deadline_site: tuple[str, int, Gate],
) -> None:
    host, port, _gate = deadline_site
    async with connected(host, port) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(10):
            await reader.readuntil(b"hello")
        await asyncio.sleep(HEAD_TIMEOUT * 2)
        writer.write(b"GET / HTTP/1.1\r\n")  # a head begun, never finished
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 408 ")
