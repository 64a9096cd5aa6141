"""The gate, the pool and the drain: slots are never lost, refusals are immediate, shutdown finishes work.

A ``Blocker`` stands in for the pipeline so a test decides when a job in a worker thread ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import random
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from aiohttp import ClientResponse, StreamReader, web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from optimizer import app as app_module
from optimizer import create_app, handlers
from optimizer.errors import Draining
from optimizer.pipeline import Limits, Output, Params, optimize
from optimizer.state import STATE, ServiceState
from tests.conftest import decode, image_bytes, multipart, served, test_settings

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MIB = 1024 * 1024


class Blocker:
    """A pipeline whose jobs wait in their thread until the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self._lock = threading.Lock()
        self.started = 0
        self.finished = 0

    def __call__(self, data: bytes, params: Params, limits: Limits) -> Output:
        with self._lock:
            self.started += 1
        try:
            self.open.wait(timeout=20)
            return optimize(data, params, limits)
        finally:
            with self._lock:
                self.finished += 1


@pytest.fixture
def blocker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Blocker]:
    blocker = Blocker()
    monkeypatch.setattr(handlers, "optimize", blocker)
    yield blocker
    blocker.open.set()  # never leave a worker thread waiting


async def until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait for a condition the server reaches asynchronously (a bounded poll, not a timing assertion)."""
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110 - the state lives in the app; there is no event to await
            await asyncio.sleep(0.01)


def in_flight(client: Client) -> int:
    assert client.app is not None
    return client.app[STATE].gate.in_flight


async def raw_request(client: Client, head: bytes, body: bytes = b"") -> tuple[bytes, asyncio.StreamWriter]:
    """Send bytes on a fresh connection; return what the server answered before closing, and the writer."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + body)
    await writer.drain()
    answer = b""
    try:
        async with asyncio.timeout(2):
            answer = await reader.read(4096)
    except TimeoutError:
        pass
    return answer, writer


async def send_upload(client: Client, data: bytes, content_type: str = "image/jpeg") -> asyncio.StreamWriter:
    """Upload ``data`` as a raw body on a fresh connection, without reading the answer: the test decides
    when the client leaves (``writer.close()``)."""
    assert client.server.port is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        f"POST /optimize HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    return writer


async def test_full_gate_answers_503_at_once(make_client: ClientFactory, blocker: Blocker) -> None:
    client = await make_client(threads=1, queue=1)
    first = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    second = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: in_flight(client) == 2 and blocker.started == 1)

    refused = await client.post("/optimize", data=multipart(image_bytes()))
    assert refused.status == 503
    body = await refused.json(content_type="application/problem+json")
    assert body["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1

    blocker.open.set()
    for response in await asyncio.gather(first, second):
        assert response.status == 200
        assert decode(await response.read()).size == (64, 48)
    await until(lambda: in_flight(client) == 0)


async def assert_refused_before_the_body(client: Client, target: str, status: int, code: str) -> None:
    """An ``Expect: 100-continue`` upload to ``target`` gets its refusal instead of 100 Continue."""
    head = (
        f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    answer, writer = await raw_request(client, head)  # no body sent at all
    writer.close()
    assert answer.startswith(f"HTTP/1.1 {status}".encode())
    assert b"100 Continue" not in answer
    assert code.encode() in answer


async def test_expect_continue_is_refused_before_the_upload(
    make_client: ClientFactory, blocker: Blocker
) -> None:
    client = await make_client(threads=1, queue=0)
    busy = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)

    await assert_refused_before_the_body(client, "/upload", 503, "overloaded")

    blocker.open.set()
    assert (await busy).status == 200


async def test_expect_continue_refuses_bad_parameters_before_the_upload(make_client: ClientFactory) -> None:
    """A request bound to fail is refused before the client sends its body, not after."""
    client = await make_client()
    await assert_refused_before_the_body(client, "/optimize?width=abc", 400, "invalid_parameter")


async def test_a_hosts_error_after_100_continue_is_still_answered(aiohttp_client: ClientFactory) -> None:
    """The interim 100 is not the response: a host middleware's failure after it must still be answered
    (aiohttp took the response as begun and dropped the connection)."""

    @web.middleware
    async def failing(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        await handler(request)
        raise RuntimeError("a bug in the host's middleware")

    parent = web.Application(middlewares=[failing])
    parent.add_subapp("/img", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))
    data = image_bytes()
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /img/optimize HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    writer.write(data)
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 500")


async def test_expect_continue_when_admitted(make_client: ClientFactory) -> None:
    client = await make_client()
    data = image_bytes()
    head = (
        b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(data)}\r\n".encode()
        + b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    answer, writer = await raw_request(client, head)
    assert answer.startswith(b"HTTP/1.1 100 Continue")
    writer.write(data)
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("cancellation", [True, False], ids=["handler-cancellation", "no-cancellation"])
async def test_no_slot_leaks_when_clients_leave_mid_upload(
    aiohttp_client: ClientFactory, cancellation: bool
) -> None:
    app = create_app(test_settings(read_timeout=30.0))
    client = await aiohttp_client(served(app, cancellation=cancellation))
    head = (
        b"POST /optimize HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: 500000\r\n\r\n"
    )
    writers = []
    for _ in range(3):
        assert client.server.port is not None
        _reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(head + image_bytes()[:1000])
        await writer.drain()
        writers.append(writer)
    await until(lambda: in_flight(client) == 3)
    for writer in writers:
        writer.close()
    await until(lambda: in_flight(client) == 0)
    response = await client.post("/optimize", data=multipart(image_bytes()))
    assert response.status == 200


@pytest.mark.parametrize("cancellation", [True, False], ids=["handler-cancellation", "no-cancellation"])
async def test_slot_held_until_the_thread_ends_when_client_leaves_mid_processing(
    aiohttp_client: ClientFactory, blocker: Blocker, cancellation: bool
) -> None:
    app = create_app(test_settings(threads=1, queue=1))
    client = await aiohttp_client(served(app, cancellation=cancellation))
    data = image_bytes()
    writer = await send_upload(client, data)
    await until(lambda: blocker.started == 1)
    writer.close()
    await asyncio.sleep(0.2)  # give the server time to notice the disconnect
    # The job is still running in its thread: its slot must still count, and so must the memory its
    # worker claimed for it after reading the header.
    assert in_flight(client) == 1
    assert app[STATE].budget.in_use > 0
    blocker.open.set()
    await until(lambda: blocker.finished == 1 and in_flight(client) == 0 and app[STATE].budget.in_use == 0)


async def test_queued_job_of_a_departed_client_is_dropped(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    app = create_app(test_settings(threads=1, queue=1))
    client = await aiohttp_client(served(app, cancellation=True))
    running = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)
    data = image_bytes()
    writer = await send_upload(client, data)
    await until(lambda: in_flight(client) == 2)
    writer.close()
    await until(lambda: in_flight(client) == 1)  # the queued job was cancelled before it ran
    blocker.open.set()
    assert (await running).status == 200
    await until(lambda: in_flight(client) == 0)
    assert blocker.started == 1


async def test_queued_job_of_a_departed_client_is_not_decoded_without_handler_cancellation(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    """aiohttp's default, and so a host's unless it says otherwise: the handler is not cancelled when
    its client leaves. Its queued job used to be decoded all the same (found in review)."""
    app = create_app(test_settings(threads=1, queue=1))
    client = await aiohttp_client(served(app, cancellation=False))
    running = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)
    writer = await send_upload(client, image_bytes())
    await until(lambda: in_flight(client) == 2)
    writer.close()
    await asyncio.sleep(0.2)  # the server sees the connection close
    blocker.open.set()
    assert (await running).status == 200
    await until(lambda: in_flight(client) == 0 and app[STATE].budget.in_use == 0)
    assert blocker.started == 1  # the departed client's image was never decoded


async def test_shutdown_drains_admitted_work(aiohttp_client: ClientFactory, blocker: Blocker) -> None:
    app = create_app(test_settings(threads=1, queue=1, drain_seconds=10.0))
    client = await aiohttp_client(app)
    pending = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)

    closing = asyncio.ensure_future(client.server.close())
    await until(lambda: app[STATE].gate.closed)
    assert not app[STATE].ready
    blocker.open.set()
    response = await pending
    assert response.status == 200
    assert decode(await response.read()).size == (64, 48)
    await closing
    assert app[STATE].abandoned == 0
    assert app[STATE].gate.in_flight == 0


async def test_drain_deadline_answers_leftovers(aiohttp_client: ClientFactory, blocker: Blocker) -> None:
    app = create_app(test_settings(threads=1, queue=1, drain_seconds=0.2))
    client = await aiohttp_client(app)
    pending = [
        asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes()))) for _ in range(2)
    ]
    await until(lambda: app[STATE].gate.in_flight == 2 and blocker.started == 1)
    closing = asyncio.ensure_future(client.server.close())
    for response in await asyncio.gather(*pending):
        assert response.status == 503
        body = await response.json(content_type="application/problem+json")
        assert body["code"] == "shutdown_deadline"
    blocker.open.set()
    await closing
    assert app[STATE].abandoned == 2


async def test_draining_app_refuses_new_requests(make_client: ClientFactory) -> None:
    client = await make_client()
    assert client.app is not None
    client.app[STATE].gate.close()
    response = await client.post("/optimize", data=multipart(image_bytes()))
    assert response.status == 503
    assert (await response.json(content_type="application/problem+json"))["code"] == "draining"
    assert response.headers["Connection"].lower() == "close"


async def test_embedded_as_sub_app(aiohttp_client: ClientFactory, blocker: Blocker) -> None:
    parent = web.Application()

    async def home(request: web.Request) -> web.Response:
        return web.Response(text="parent")

    parent.router.add_get("/", home)
    image_app = create_app(test_settings(threads=1, queue=1, drain_seconds=10.0))
    parent.add_subapp("/img", image_app)
    client = await aiohttp_client(TestServer(parent))

    assert (await client.get("/")).status == 200
    assert (await client.get("/img/healthz")).status == 200
    assert (await client.get("/img/readyz")).status == 200
    bad = await client.post("/img/optimize?width=0", data=multipart(image_bytes()))
    assert bad.status == 400
    assert bad.headers["Content-Type"].startswith("application/problem+json")

    blocker.open.set()
    ok = await client.post("/img/upload", data=multipart(image_bytes((600, 400))))
    assert ok.status == 200
    assert decode(await ok.read()).size == (300, 200)

    # The parent's shutdown drains the sub-app's admitted work.
    blocker.open.clear()
    pending = asyncio.ensure_future(client.post("/img/optimize", data=multipart(image_bytes())))
    await until(lambda: image_app[STATE].gate.in_flight == 1 and blocker.started == 2)
    closing = asyncio.ensure_future(client.server.close())
    await until(lambda: image_app[STATE].gate.closed)
    blocker.open.set()
    assert (await pending).status == 200
    await closing
    assert image_app[STATE].abandoned == 0


async def test_an_upload_leaves_the_hosts_own_read_size_on_its_connection(
    aiohttp_client: ClientFactory,
) -> None:
    # The service reads admitted uploads in large steps, then puts back what the connection had: here
    # a host application that chose its own read size per connection.
    own_size = 1024 * 1024
    seen: list[int] = []
    configured: set[int] = set()

    @web.middleware
    async def own_read_size(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if id(transport) not in configured:  # once per connection, as a host would on connect
            configured.add(id(transport))
            transport.max_size = own_size  # type: ignore[attr-defined]
        seen.append(transport.max_size)  # type: ignore[attr-defined]
        return await handler(request)

    async def probe(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    parent = web.Application(middlewares=[own_read_size])
    parent.router.add_get("/probe", probe)
    parent.add_subapp("/img", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))
    assert (await client.post("/img/optimize", data=multipart(image_bytes()))).status == 200
    assert (await client.get("/probe")).status == 200  # the same keep-alive connection
    assert seen == [own_size, own_size]


async def test_two_instances_share_nothing(aiohttp_client: ClientFactory, blocker: Blocker) -> None:
    parent = web.Application()
    first = create_app(test_settings(threads=1, queue=0))
    second = create_app(test_settings(threads=1, queue=0, max_dimension=32))
    parent.add_subapp("/a", first)
    parent.add_subapp("/b", second)
    client = await aiohttp_client(TestServer(parent))

    busy = asyncio.ensure_future(client.post("/a/optimize", data=multipart(image_bytes())))
    await until(lambda: first[STATE].gate.in_flight == 1 and blocker.started == 1)
    assert (await client.post("/a/optimize", data=multipart(image_bytes()))).status == 503
    assert second[STATE].gate.in_flight == 0
    assert first[STATE].pool is not second[STATE].pool

    blocker.open.set()
    response = await client.post("/b/optimize", data=multipart(image_bytes((64, 48))))
    assert response.status == 200
    assert decode(await response.read()).size == (32, 24)  # /b's own max_dimension
    assert (await busy).status == 200


async def test_two_embedded_instances_drain_side_by_side(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    """A host runs its sub-applications' on_shutdown one after another: each instance must begin its drain
    and return, or a second instance would stay open and ready while the first drains, and the host's
    shutdown would take the sum of their deadlines."""
    parent = web.Application()
    first = create_app(test_settings(threads=1, queue=1, drain_seconds=1.5))
    second = create_app(test_settings(threads=1, queue=1, drain_seconds=1.5))
    parent.add_subapp("/a", first)
    parent.add_subapp("/b", second)
    client = await aiohttp_client(TestServer(parent))
    pending = [
        asyncio.ensure_future(client.post(f"{prefix}/optimize", data=multipart(image_bytes())))
        for prefix in ("/a", "/b")
    ]
    await until(lambda: blocker.started == 2)
    closing = asyncio.ensure_future(client.server.close())
    await until(lambda: first[STATE].gate.closed)
    await until(lambda: second[STATE].gate.closed)  # while the first still has its request in flight
    assert first[STATE].gate.in_flight == 1
    assert not second[STATE].ready
    began, then = first[STATE].drain_deadline, second[STATE].drain_deadline
    assert began is not None
    assert then is not None
    assert abs(began - then) < 0.5  # both began together, not one deadline after the other
    for response in await asyncio.gather(*pending):  # still blocked at the deadline: answered 503
        assert response.status == 503
        body = await response.json(content_type="application/problem+json")
        assert body["code"] == "shutdown_deadline"
    blocker.open.set()
    await closing
    assert first[STATE].abandoned == second[STATE].abandoned == 1


async def test_an_upload_that_has_all_arrived_at_a_hosts_shutdown_can_finish() -> None:
    """At a host's shutdown the uploads still arriving are answered at once (their bytes would be
    dropped); one whose body is all in, waiting to be read, is not one of them."""

    class Protocol:  # what a StreamReader asks of its protocol
        def pause_reading(self, **_options: object) -> None: ...

        def resume_reading(self, **_options: object) -> None: ...

    app = create_app(test_settings())
    state = app[STATE]
    arrived = StreamReader(Protocol(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    arrived.feed_data(b"the whole upload")
    arrived.feed_eof()
    arriving = StreamReader(Protocol(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    arriving.feed_data(b"the first part")
    state.reading.update({arrived, arriving})
    await app_module._on_shutdown(app)
    assert await arrived.read() == b"the whole upload"
    assert isinstance(arriving.exception(), Draining)
    if state.drain_timer is not None:
        state.drain_timer.cancel()


async def test_upload_arriving_at_a_hosts_shutdown_is_answered_not_hung(
    aiohttp_client: ClientFactory,
) -> None:
    # Embedded, the host's runner stops reading request bodies before on_shutdown runs (aiohttp drops
    # the bytes), so an upload in flight then cannot finish: it must get a prompt 503, not hold its slot
    # until the drain deadline.
    app = create_app(test_settings(read_timeout=60.0, drain_seconds=60.0))
    client = await aiohttp_client(app)
    head = (
        b"POST /optimize HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
    )
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head + image_bytes()[:500])
    await writer.drain()
    await until(lambda: app[STATE].gate.in_flight == 1)
    async with asyncio.timeout(20):  # far below the 60 s drain deadline
        await client.server.close()
        answer = await reader.read(4096)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503")
    assert b"draining" in answer
    assert app[STATE].gate.in_flight == 0


async def test_refused_upload_body_is_not_read(
    make_client: ClientFactory, blocker: Blocker, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that does not use Expect: 100-continue, refused while its 20 MB upload is under way:
    # it gets the 503 at once, the server reads only what was already in flight (not the 20 MB), and
    # the connection is closed after the linger time.
    client = await make_client(threads=1, queue=0, linger_seconds=0.5, max_body_bytes=50_000_000)
    busy = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)

    size = 20_000_000
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /optimize HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {size}\r\n\r\n".encode()
    )

    async def upload() -> int:
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < size:
                writer.write(bytes(65536))
                await writer.drain()  # blocks once the server stops reading
                sent += 65536
        return sent

    sending = asyncio.ensure_future(upload())
    with caplog.at_level(logging.INFO, logger="optimizer.access"):
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503")
            assert b"Connection: close" in head
            # then the server closes the connection: EOF, or a reset since this client is still sending
            with contextlib.suppress(ConnectionError):
                await reader.read()
    sending.cancel()
    writer.close()
    refused = [r for r in caplog.records if r.__dict__.get("fields", {}).get("code") == "overloaded"]
    assert refused
    assert refused[0].__dict__["fields"]["bytes_in"] < size // 2
    blocker.open.set()
    assert (await busy).status == 200


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/optimize?width=abc", 400, "invalid_parameter"),
        ("/healthz", 405, "method_not_allowed"),
        ("/nowhere", 404, "not_found"),
    ],
)
async def test_an_upload_to_a_wrong_route_is_not_read_either(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture, path: str, status: int, code: str
) -> None:
    """aiohttp reads the rest of an unread body after any answer, at full speed (2 GB into one 405 in
    1.2 s): every answer, not only the service's own refusals, leaves it unread."""
    client = await make_client(linger_seconds=0.5)
    size = 100_000_000
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n".encode()
        + f"Content-Length: {size}\r\n\r\n".encode()
    )

    async def upload() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536):
                writer.write(bytes(65536))
                await writer.drain()  # blocks once the server stops reading

    sending = asyncio.ensure_future(upload())
    with caplog.at_level(logging.INFO, logger="optimizer.access"):
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(f"HTTP/1.1 {status}".encode())
            assert b"Connection: close" in head
            with contextlib.suppress(ConnectionError):
                await reader.read()  # the server closes after the linger time
    sending.cancel()
    writer.close()
    logged = [
        r.__dict__["fields"] for r in caplog.records if r.__dict__.get("fields", {}).get("code") == code
    ]
    assert logged
    assert logged[0]["bytes_in"] < size // 10


async def refused_uploads(
    port: int, path: str, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections, all at once, each starting a 20 MB raw upload that the full gate refuses;
    each must get its 503 (read up to the end of its head)."""

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n".encode()
            + b"Content-Length: 20000000\r\n\r\n"
            + bytes(65536)
        )
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        return reader, writer

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Returns once the server has closed the connection (EOF, or a reset: this client still sends)."""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):  # far below the tests' 60 s linger time
            await reader.read()  # the rest of the 503's body, then EOF


async def test_refused_connections_beyond_the_lingering_limit_close_early(
    make_client: ClientFactory, blocker: Blocker
) -> None:
    # Each refused upload's connection is kept (its body unread) for the linger time, but once more
    # than the limit of them wait, the oldest are closed early. Every client still gets its 503 first.
    client = await make_client(threads=1, queue=0, linger_seconds=60.0, max_body_bytes=50_000_000)
    assert client.app is not None
    lingering = client.app[STATE].lingering
    # On Linux a connection closes early once its 503 is acknowledged, however young; elsewhere after
    # ``min_age``.
    lingering.limit, lingering.min_age = 2, (60.0 if sys.platform == "linux" else 0.0)
    busy = asyncio.ensure_future(client.post("/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)

    assert client.server.port is not None
    connections = []
    for _ in range(4):  # one after another: the first two are the oldest
        connections += await refused_uploads(client.server.port, "/optimize", 1)
    for reader, _writer in connections[:2]:
        await closed_by_server(reader)
    assert len(lingering) == 2
    assert not any(transport.is_closing() for transport in lingering._open)
    metrics = await (await client.get("/metrics")).text()
    assert "optimizer_lingering_connections 2.0" in metrics.splitlines()
    for _reader, writer in connections:
        writer.close()
    blocker.open.set()
    assert (await busy).status == 200


async def test_embedded_refusals_are_answered_before_an_early_close(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    # A host whose middleware awaits after the handler delays the write of each 503: a burst of refusals
    # beyond the lingering limit must still answer every one before closing it.
    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        await asyncio.sleep(0)
        return response

    parent = web.Application(middlewares=[audit])
    image_app = create_app(test_settings(threads=1, queue=0, linger_seconds=60.0, max_body_bytes=50_000_000))
    parent.add_subapp("/img", image_app)
    client = await aiohttp_client(TestServer(parent))
    lingering = image_app[STATE].lingering
    lingering.limit, lingering.min_age = 2, 0.0
    busy = asyncio.ensure_future(client.post("/img/optimize", data=multipart(image_bytes())))
    await until(lambda: blocker.started == 1)

    assert client.server.port is not None
    connections = await refused_uploads(client.server.port, "/img/optimize", 12)
    for _reader, writer in connections:
        writer.close()
    blocker.open.set()
    assert (await busy).status == 200


async def test_request_waiting_for_memory_at_the_drain_deadline_gets_503(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    from optimizer.pipeline import inspect

    big = image_bytes((1800, 1800), "RGBA", fmt="PNG")
    need = inspect(big, Params(), _limits())
    # Room for one such image, not two: the second waits for memory (on the loop, holding no thread).
    app = create_app(
        test_settings(threads=2, queue=2, drain_seconds=0.3, memory_budget=need * 3 // 2, memory_wait=30.0)
    )
    state = app[STATE]
    client = await aiohttp_client(app)
    first = asyncio.ensure_future(client.post("/optimize", data=multipart(big)))
    await until(lambda: blocker.started == 1)
    second = asyncio.ensure_future(client.post("/optimize", data=multipart(big)))
    await until(lambda: state.gate.in_flight == 2)
    await asyncio.sleep(0.1)  # the second is now waiting for room in the budget, holding no thread
    assert blocker.started == 1
    closing = asyncio.ensure_future(client.server.close())
    response = await second
    assert response.status == 503
    assert (await response.json(content_type=None))["code"] == "shutdown_deadline"
    blocker.open.set()
    await first
    await closing
    # The first request's worker was still busy at the deadline: its slot and memory come back when
    # that thread ends, not before.
    await until(lambda: state.budget.in_use == 0 and state.gate.in_flight == 0)


def _limits() -> Limits:
    settings = test_settings()
    return Limits(settings.max_pixels, settings.max_dimension, settings.input_formats)


# --- The memory claim: made in the worker after the header, or waited for on the loop ----------------


@functools.cache
def big_png() -> bytes:
    """An image whose decode needs a sizeable share of memory (1800 x 1800 RGBA PNG)."""
    return image_bytes((1800, 1800), "RGBA", fmt="PNG")


@dataclass
class MemoryHeld:
    """A service whose memory budget holds one ``big_png()``, not two, with a first one in its worker."""

    client: Client
    state: ServiceState
    first: asyncio.Future[ClientResponse]
    need: int  # what the first one's worker claimed for its decode


async def _first_holds_the_memory(
    aiohttp_client: ClientFactory, blocker: Blocker, *, cancellation: bool = True
) -> MemoryHeld:
    from optimizer.pipeline import inspect

    need = inspect(big_png(), Params(), _limits())
    app = create_app(test_settings(threads=2, queue=2, memory_budget=need * 3 // 2, memory_wait=30.0))
    client = await aiohttp_client(served(app, cancellation=cancellation))
    first = asyncio.ensure_future(client.post("/optimize", data=multipart(big_png())))
    await until(lambda: blocker.started == 1)
    return MemoryHeld(client, app[STATE], first, app[STATE].budget.in_use)


async def test_an_image_without_room_waits_on_the_loop_then_is_served(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    held = await _first_holds_the_memory(aiohttp_client, blocker)
    state, need = held.state, held.need
    second = asyncio.ensure_future(held.client.post("/optimize", data=multipart(big_png())))
    await until(lambda: len(state.budget._waiters) == 1)  # its worker found no room and handed it back
    assert blocker.started == 1 and state.budget.in_use == need
    blocker.open.set()
    responses = await asyncio.gather(held.first, second)
    assert [r.status for r in responses] == [200, 200]
    assert blocker.started == 2
    await until(lambda: state.budget.in_use == 0 and state.gate.in_flight == 0)
    assert state.budget.peak == need  # never both at once


async def test_a_client_leaving_while_its_image_waits_for_memory_leaves_nothing_behind(
    aiohttp_client: ClientFactory, blocker: Blocker
) -> None:
    held = await _first_holds_the_memory(aiohttp_client, blocker, cancellation=True)
    state, need = held.state, held.need
    writer = await send_upload(held.client, big_png(), "image/png")
    await until(lambda: len(state.budget._waiters) == 1)
    writer.close()
    await until(lambda: state.gate.in_flight == 1)
    assert not state.budget._waiters and state.budget.in_use == need
    blocker.open.set()
    assert (await held.first).status == 200
    await until(lambda: state.budget.in_use == 0 and state.gate.in_flight == 0)
    assert blocker.started == 1  # the departed request was never decoded


async def test_uploads_held_in_memory_count_in_the_budget(make_client: ClientFactory) -> None:
    """Uploads were outside the memory budget: 64 clients posting 25 MB BMPs to 16 threads in a 1 GiB
    container held 1.6 GB of them, and the kernel killed the service (found in review). They now have an
    allowance of half the budget, counted as their bytes arrive (heads declaring large bodies and
    sending none held it before any byte came, a later review), and checked from a declared length before
    the body is read."""
    client = await make_client(threads=1, queue=4, memory_budget=16 * MIB, memory_wait=0.3)
    assert client.app is not None
    state = client.app[STATE]
    allowance = state.budget.upload_allowance  # 8 MiB
    # A head declaring 6 MiB and sending none holds nothing; once 5 MiB of it arrive, they count.
    held = await send_head(client, "/optimize", 6 * MIB, b"")
    await until(lambda: state.gate.in_flight == 1)
    assert state.budget.uploads == 0
    held.write(b"\xff\xd8" + bytes(5 * MIB - 2))
    await until(lambda: state.budget.uploads == 5 * MIB)

    # 5 + 4 MiB is over the allowance: refused from the declared length before the body, 503.
    response = await client.post(
        "/optimize", data=io.BytesIO(bytes(4 * MIB)), headers={"Content-Type": "image/jpeg"}
    )
    assert (response.status, (await response.json())["code"]) == (503, "overloaded")
    assert response.headers["Retry-After"]
    # Without a declared length it is counted as it arrives, and refused once over the allowance.
    chunked = await client.post(
        "/optimize", data=_chunks(bytes(4 * MIB), 64 * 1024), headers={"Content-Type": "image/jpeg"}
    )
    assert (chunked.status, (await chunked.json())["code"]) == (503, "overloaded")
    assert state.budget.uploads == 5 * MIB

    held.close()
    await until(lambda: state.budget.uploads == 0 and state.gate.in_flight == 0)
    # Larger than the allowance, never: 413 before the body.
    too_big = await client.post(
        "/optimize", data=io.BytesIO(bytes(allowance + 1)), headers={"Content-Type": "image/jpeg"}
    )
    assert (too_big.status, (await too_big.json())["code"]) == (413, "over_memory_budget")
    fits = await client.post(
        "/optimize", data=io.BytesIO(bytes(allowance)), headers={"Content-Type": "image/jpeg"}
    )
    assert (fits.status, (await fits.json())["code"]) == (415, "unsupported_format")  # read, then judged
    await until(lambda: state.budget.in_use == 0 and state.budget.uploads == 0 and state.gate.in_flight == 0)


async def test_an_upload_whose_last_piece_crosses_the_allowance_is_refused(
    make_client: ClientFactory,
) -> None:
    """The body's end was fed before its last piece was counted, so the refusal reached nobody and the
    upload was answered 200 beyond the allowance (found in review)."""
    client = await make_client(threads=1, queue=4, memory_budget=16 * MIB)
    assert client.app is not None and client.server.port is not None
    budget = client.app[STATE].budget
    body = image_bytes((64, 64)) + bytes(3 * MIB)  # a JPEG, then padding after its end
    filler = await send_head(client, "/optimize", 5 * MIB, b"")  # declared first: it holds nothing yet
    await until(lambda: client.app is not None and client.app[STATE].gate.in_flight == 1)
    reader, writer = await open_head(client, "/optimize", len(body), body[:-100])
    await until(lambda: budget.uploads == len(body) - 100)
    filler.write(bytes(budget.upload_allowance - budget.uploads - 50))  # all the allowance but 50 bytes
    await until(lambda: budget.upload_allowance - budget.uploads == 50)
    writer.write(body[-100:])  # the last piece: 100 bytes where 50 are left
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
    filler.close()
    writer.close()
    await until(lambda: budget.uploads == 0 and budget.in_use == 0)


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def send_head(client: Client, path: str, length: int, first: bytes) -> asyncio.StreamWriter:
    """A request of declared ``length`` whose body stops after ``first``: admitted, and left unfinished."""
    _reader, writer = await open_head(client, path, length, first)
    return writer


async def open_head(
    client: Client, path: str, length: int, first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``send_head``, with the connection's reader for the answer."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n".encode()
        + f"Content-Length: {length}\r\n\r\n".encode()
        + first
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("failure", ["corrupt", "bug"])
async def test_memory_claimed_in_the_worker_comes_back_when_the_image_fails(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    from optimizer.errors import CorruptImage

    held_while_failing: list[int] = []

    def failing(data: bytes, params: Params, limits: Limits) -> Output:
        held_while_failing.append(state.budget.in_use)
        raise CorruptImage("does not decode") if failure == "corrupt" else ValueError("a bug")

    monkeypatch.setattr(handlers, "optimize", failing)
    client = await make_client()
    assert client.app is not None
    state = client.app[STATE]
    response = await client.post("/optimize", data=multipart(image_bytes()))
    assert response.status == (422 if failure == "corrupt" else 500)
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert held_while_failing and held_while_failing[0] > 0
    assert state.budget.in_use == 0 and state.gate.in_flight == 0


@pytest.mark.parametrize("cancellation", [True, False], ids=["handler-cancellation", "no-cancellation"])
async def test_a_client_gone_before_its_header_was_read_is_not_decoded(
    aiohttp_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, cancellation: bool
) -> None:
    header_read = threading.Event()
    decoded: list[bytes] = []
    from optimizer.pipeline import inspect

    def slow_inspect(data: bytes, params: Params, limits: Limits) -> int:
        header_read.wait(10)
        return inspect(data, params, limits)

    def recording_optimize(data: bytes, params: Params, limits: Limits) -> Output:
        decoded.append(data)
        return optimize(data, params, limits)

    monkeypatch.setattr(handlers, "inspect", slow_inspect)
    monkeypatch.setattr(handlers, "optimize", recording_optimize)
    app = create_app(test_settings(threads=1, queue=1))
    state = app[STATE]
    client = await aiohttp_client(served(app, cancellation=cancellation))
    data = image_bytes()
    writer = await send_upload(client, data)
    await until(lambda: state.gate.in_flight == 1)
    writer.close()
    await asyncio.sleep(0.3)  # the server notices the disconnect (and cancels the handler, if it does)
    header_read.set()
    await until(lambda: state.gate.in_flight == 0 and state.budget.in_use == 0)
    assert decoded == []  # its worker read the header, found nobody waiting, and stopped there


@pytest.mark.parametrize(
    ("target", "expect", "status", "code"),
    [
        ("POST /nope", "100-continue", 404, "not_found"),
        ("PUT /optimize", "100-continue", 405, "method_not_allowed"),
        ("POST /nope", "200-ok", 404, "not_found"),
        ("GET /upload", "200-ok", 405, "method_not_allowed"),
    ],
)
async def test_a_request_no_route_takes_is_refused_before_its_body_whatever_it_expects(
    make_client: ClientFactory, target: str, expect: str, status: int, code: str
) -> None:
    """Found in review: aiohttp's hook for such requests said 100 Continue to an upload it was about to
    refuse, or answered an unknown expectation with a plain-text 417 that no log or metric saw."""
    client = await make_client()
    head = (
        f"{target} HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: 1000000\r\nExpect: {expect}\r\n\r\n"
    ).encode()
    answer, writer = await raw_request(client, head)  # no body sent at all
    writer.close()
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer
    assert b"100 Continue" not in answer
    assert b"application/problem+json" in answer
    assert f'"code": "{code}"'.encode() in answer
    if status == 405:
        assert b"\r\nAllow: " in answer
    assert client.app is not None
    metrics = client.app[STATE].metrics.render().decode()
    assert f'optimizer_requests_total{{route="unmatched",status="{status}"}} 1.0' in metrics


async def test_a_client_gone_before_100_continue_is_one_access_line_not_an_error(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: writing 100 Continue to a client already gone raised before any middleware, and
    aiohttp logged an ERROR with a traceback for each, uncounted."""
    client = await make_client()
    assert client.server.port is not None
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", client.server.port)) as gone:
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
            gone.sendall(
                b"POST /optimize HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
            )
    assert client.app is not None
    metrics = client.app[STATE].metrics
    await until(lambda: b"client_closed" in metrics.render())
    await asyncio.sleep(0.2)  # let the other connections' handlers run too
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_request_behind_one_asking_to_upgrade_is_not_swallowed(make_client: ClientFactory) -> None:
    """aiohttp's parser takes what follows a request with ``Upgrade`` as the new protocol's bytes: the
    connection is closed after the answer, so the client knows to send the rest again."""
    client = await make_client()
    head = (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head)
    async with asyncio.timeout(10):
        answer = await reader.read()  # to the end: the server closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in answer


def noise_png(size: tuple[int, int]) -> bytes:
    """Pixels no encoder can shrink: the answer is as large as the request for it can make it."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(7).randbytes(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_an_answer_the_client_does_not_read_is_counted_then_dropped(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a large answer nobody read stayed in the process, outside the memory budget, for
    as long as the client kept its connection (1.8 GB of RSS for 18 of them, nothing in flight)."""
    caplog.set_level(logging.INFO, logger="optimizer.access")
    client = await make_client(read_timeout=1.0)
    assert client.app is not None and client.server.port is not None
    budget = client.app[STATE].budget
    data = noise_png((800, 800))
    with socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel cannot take it for us
        reader.setblocking(False)
        await asyncio.get_running_loop().sock_connect(reader, ("127.0.0.1", client.server.port))
        await asyncio.get_running_loop().sock_sendall(
            reader,
            b"POST /optimize?format=png&width=3000&enlarge=1 HTTP/1.1\r\nHost: t\r\n"
            + f"Content-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data,
        )
        await until(lambda: budget.in_use > 0 and in_flight(client) == 0, 30)  # out of the gate, unsent
        held = budget.in_use
        assert held > 10_000_000  # the answer, counted while it waits for the client
        await until(lambda: budget.in_use == 0, 30)  # given up after the allowance
    (abandoned,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "answer_abandoned"]
    access = [r for r in caplog.records if r.name == "optimizer.access"]
    assert abandoned.fields["request_id"] == access[-1].fields["request_id"]  # type: ignore[attr-defined]
    assert 0 <= abandoned.fields["bytes_given"] < abandoned.fields["bytes_out"]  # type: ignore[attr-defined]


async def test_an_answer_read_slowly_but_steadily_arrives_whole(make_client: ClientFactory) -> None:
    client = await make_client(read_timeout=1.0)
    data = noise_png((300, 300))
    response = await client.post(
        "/optimize?format=png&width=1200&enlarge=1", data=data, headers={"Content-Type": "image/png"}
    )
    assert response.status == 200
    body = b""
    while chunk := await response.content.read(200_000):
        body += chunk
        await asyncio.sleep(0.3)  # slower than the loopback, faster than the allowance per piece
    assert len(body) == int(response.headers["Content-Length"])
    assert decode(body).size == (1200, 1200)
    assert client.app is not None
    assert client.app[STATE].budget.in_use == 0


async def test_a_hosts_shutdown_that_cuts_an_answer_before_the_drain_deadline_counts_it() -> None:
    """A host whose runner gives handlers less time than ``drain_seconds`` cancels an answer still being
    sent; it was taken for a client that left, neither counted nor logged (found in review)."""
    app = create_app(test_settings(threads=1, drain_seconds=20.0, read_timeout=30.0))
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    noise = Image.frombytes("RGB", (1500, 1500), random.Random(1).randbytes(1500 * 1500 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG", compress_level=0)  # a PNG answer of ~6.7 MB, more than the socket buffers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _reader, writer = await asyncio.open_connection(sock=sock)
    body = buffer.getvalue()
    writer.write(
        b"POST /optimize?format=png HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    state = app[STATE]
    await until(lambda: state.answers.count == 1, 30)  # sent in part, and not read
    await runner.cleanup()
    writer.close()
    assert state.answers.cut == 1 and state.answers.count == 0
