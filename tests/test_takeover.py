"""Bodies received past aiohttp's parser (``optimizer.takeover``): what the client sees must not change.

Each test talks raw HTTP/1.1 over one socket, so that it can put requests back to back on a connection,
pipeline them, or stop half-way through a body, and then checks that every answer is the right one and
that the connection goes on carrying requests.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.typedefs import Handler, Middleware

from optimizer import create_app, takeover
from optimizer.listener import PacedSite
from optimizer.state import STATE
from tests.conftest import ClientFactory, decode, test_settings
from tests.test_faults import noisy_jpeg
from tests.test_lifecycle import until

Client = TestClient[web.Request, web.Application]
BOUNDARY = "takeover-0123456789abcdef"


@pytest.fixture(scope="module")
def photo() -> bytes:
    # Larger than what asyncio reads at once (256 KiB) and than aiohttp buffers before it pauses the
    # socket, so that most of the body is still to come when the handler starts reading it.
    data = noisy_jpeg((1200, 900))
    assert len(data) > 500_000
    return data


@pytest.fixture
def switches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of times a connection's transport was handed to a ``_Receiver``."""
    made: list[int] = []
    original = takeover._Receiver.__init__

    def counting(self: takeover._Receiver, *args: object, **kwargs: object) -> None:
        made.append(1)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(takeover._Receiver, "__init__", counting)
    yield made


def form_body(*parts: tuple[str, bytes], epilogue: bytes = b"\r\n") -> bytes:
    body = b""
    for name, content in parts:
        body += (
            (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="p.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
    return body + f"--{BOUNDARY}--".encode() + epilogue


def post(body: bytes, content_type: str, target: str = "/optimize?width=300") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def form_post(*parts: tuple[str, bytes], epilogue: bytes = b"\r\n") -> bytes:
    return post(form_body(*parts, epilogue=epilogue), f"multipart/form-data; boundary={BOUNDARY}")


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(30):  # a liveness bound: a connection whose parser lost its place hangs
        return await _read_answer(reader)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def connect(client: Client) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert client.server.port is not None
    return await asyncio.open_connection("127.0.0.1", client.server.port)


def assert_resized(answer: tuple[int, dict[str, str], bytes]) -> None:
    status, headers, body = answer
    assert status == 200, body[:300]
    assert headers["content-type"] == "image/jpeg"
    assert decode(body).size == (300, 225)


async def upload_form_and_raw(port: int, photo: bytes) -> None:
    """The photo as a form, then as a raw body, on one connection: each answered with the image."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in (form_post(("image", photo)), post(photo, "image/jpeg")):
            writer.write(request)
            assert_resized(await read_answer(reader))
    finally:
        writer.close()


async def test_uploads_on_one_connection_are_received_past_the_parser(
    make_client: ClientFactory, photo: bytes, switches: list[int]
) -> None:
    client = await make_client()
    reader, writer = await connect(client)
    requests = [
        form_post(("image", photo)),  # the usual layout: received in place
        post(photo, "image/jpeg"),  # a raw body
        form_post(("image", photo), ("note", b"a field after the image")),  # read as usual from memory
        form_post(("image", photo), epilogue=b""),  # no CRLF after the close delimiter
        form_post(("note", b"before"), ("image", photo), epilogue=b"\r\nan epilogue\r\n"),
    ]
    try:
        for request in requests:
            writer.write(request)
            assert_resized(await read_answer(reader))
    finally:
        writer.close()
    assert len(switches) == len(requests)
    assert client.app[STATE].gate.in_flight == 0


async def test_a_request_pipelined_behind_a_body_is_read_by_a_fresh_parser(
    make_client: ClientFactory, photo: bytes, switches: list[int]
) -> None:
    # The second request's bytes follow the body's last byte at once: whatever reads the body must stop
    # exactly there, and the connection's parser must start the next request from its first byte.
    client = await make_client()
    reader, writer = await connect(client)
    try:
        writer.write(form_post(("image", photo)) + b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert_resized(await read_answer(reader))
        status, _headers, body = await read_answer(reader)
        assert status == 200
        assert json.loads(body) == {"status": "ok"}
        writer.write(post(photo, "image/jpeg"))  # and the connection goes on
        assert_resized(await read_answer(reader))
    finally:
        writer.close()
    assert len(switches) == 2


async def test_without_a_switchable_transport_the_stream_fills_the_same_buffer(
    make_client: ClientFactory, photo: bytes, switches: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Behind TLS, on uvloop or under an aiohttp whose internals differ, the rest of the body comes from
    # aiohttp's stream instead.
    monkeypatch.setattr(takeover, "_switchable", lambda _request: False)
    client = await make_client()
    assert client.server.port is not None
    await upload_form_and_raw(client.server.port, photo)
    assert not switches


async def test_a_client_that_leaves_mid_body_leaves_nothing_behind(
    make_client: ClientFactory, photo: bytes, switches: list[int]
) -> None:
    client = await make_client()
    for kind in ("form", "raw"):
        request = form_post(("image", photo)) if kind == "form" else post(photo, "image/jpeg")
        reader, writer = await connect(client)
        writer.write(request[: len(request) // 2])
        await writer.drain()
        await until(lambda: len(switches) > 0 and client.app[STATE].gate.in_flight == 1)
        writer.close()
        await until(lambda: client.app[STATE].gate.in_flight == 0)
        assert not client.app[STATE].reading
        switches.clear()
    # and the service goes on serving
    reader, writer = await connect(client)
    try:
        writer.write(post(photo, "image/jpeg"))
        assert_resized(await read_answer(reader))
    finally:
        writer.close()


async def test_a_body_that_stalls_past_the_parser_gets_408_and_a_closed_connection(
    make_client: ClientFactory, photo: bytes, switches: list[int]
) -> None:
    client = await make_client(read_timeout=0.5, min_upload_rate=10_000_000)
    reader, writer = await connect(client)
    try:
        request = post(photo, "image/jpeg")
        writer.write(request[: len(request) - 1000])  # and nothing more
        async with asyncio.timeout(20):
            status, headers, body = await read_answer(reader)
            assert status == 408
            assert json.loads(body)["code"] == "upload_stalled"
            assert headers["connection"].lower() == "close"
            assert switches
            await until(lambda: client.app[STATE].gate.in_flight == 0)
    finally:
        writer.close()


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in chunked transfer coding, ``size`` bytes a chunk."""
    pieces = [body[at : at + size] for at in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["declared length", "chunked"])
async def test_a_body_arriving_steadily_outlasts_the_read_timeout(
    make_client: ClientFactory, photo: bytes, switches: list[int], framing: str
) -> None:
    # Every min_upload_rate bytes buy one more second (mod_reqtimeout's rule): the deadline is moved
    # by what arrives, whether past aiohttp's parser or through it.
    client = await make_client(read_timeout=0.4, min_upload_rate=100_000)
    if framing == "chunked":
        head = b"POST /optimize?width=300 HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
        request = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(photo, 16 * 1024)
    else:
        request = post(photo, "image/jpeg")
    reader, writer = await connect(client)
    try:
        pieces = 12  # each earns more time than the pause after it takes, over 3 x the read timeout
        size = -(-len(request) // pieces)
        for at in range(0, len(request), size):
            writer.write(request[at : at + size])
            await writer.drain()
            await asyncio.sleep(0.12)
        assert_resized(await read_answer(reader))
    finally:
        writer.close()
    assert bool(switches) == (framing == "declared length")


async def test_a_body_that_stalls_after_earning_time_gets_408(
    make_client: ClientFactory, photo: bytes, switches: list[int]
) -> None:
    # The deadline was moved on by the first bytes, and must still fire once they stop.
    client = await make_client(read_timeout=0.3, min_upload_rate=500_000)
    reader, writer = await connect(client)
    try:
        request = post(photo, "image/jpeg")
        writer.write(request[: len(request) // 2])  # earns ~0.5 s more, then nothing
        async with asyncio.timeout(20):
            status, _headers, body = await read_answer(reader)
        assert status == 408
        assert json.loads(body)["code"] == "upload_stalled"
        assert switches
        await until(lambda: client.app[STATE].gate.in_flight == 0)
    finally:
        writer.close()


async def test_a_declared_length_over_the_cap_is_refused_before_any_buffer(
    make_client: ClientFactory, switches: list[int]
) -> None:
    client = await make_client(max_body_bytes=1000)
    reader, writer = await connect(client)
    try:
        writer.write(post(b"x" * 100, "image/jpeg")[:-100].replace(b"Length: 100", b"Length: 5000000"))
        status, _headers, body = await read_answer(reader)
        assert status == 413
        assert json.loads(body)["code"] == "body_too_large"
    finally:
        writer.close()
    assert not switches


async def read_answers(reader: asyncio.StreamReader, seconds: float) -> list[int]:
    """The statuses of every answer that arrives within ``seconds`` (until the connection closes)."""
    statuses: list[int] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                statuses.append((await _read_answer(reader))[0])
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    return statuses


async def test_a_second_content_encoding_keeps_the_body_with_aiohttps_parser(
    make_client: ClientFactory, switches: list[int]
) -> None:
    # aiohttp decodes by the last Content-Encoding header: "identity" first, then "gzip", must not be
    # read as an identity body, or the decompressed bytes are counted against Content-Length and the
    # body's end is parsed as a request of its own (found in review).
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    compressed, size = next(
        (packed, n)
        for n in range(40, 400)
        if n - len(packed := gzip.compress(b"A" * n, mtime=0)) == len(smuggled)
    )
    body = compressed + b"P" * 5000 + smuggled
    head = (
        "POST /optimize?width=300 HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        f"Content-Encoding: identity\r\nContent-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    client = await make_client()
    reader, writer = await connect(client)
    try:
        writer.write(head + compressed)
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is reading the body
        writer.write(body[len(compressed) :])
        assert 200 not in await read_answers(reader, 3)  # no answer from /healthz
    finally:
        writer.close()
    assert not switches
    assert size > 0


# A client in a process of its own, so that its bytes keep arriving while the server's loop turns: a
# few bytes at a time, as fast as the socket takes them, until it reads an answer or the connection ends.
TRICKLER = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"POST /optimize HTTP/1.1\\r\\nHost: t\\r\\nContent-Type: image/jpeg\\r\\n"
          b"Content-Length: 1000000\\r\\n\\r\\n" + b"\\xff" * 70000)
s.setblocking(False)
answer, ending, stop = b"", "", time.monotonic() + 10
while time.monotonic() < stop and b"\\r\\n" not in answer:
    try:
        s.send(b"\\xff" * 7)
    except BlockingIOError:
        pass
    except OSError as exc:
        ending = type(exc).__name__
        break
    try:
        chunk = s.recv(65536)
    except BlockingIOError:
        continue
    except OSError as exc:
        ending = type(exc).__name__
        break
    if not chunk:
        ending = "closed"
        break
    answer += chunk
print(answer.split(b"\\r\\n", 1)[0].decode() or ending or "nothing")
"""


@pytest.mark.parametrize("attempt", range(3))
async def test_a_body_trickling_past_its_deadline_still_gets_408(
    make_client: ClientFactory, switches: list[int], caplog: pytest.LogCaptureFixture, attempt: int
) -> None:
    # Bytes that arrive after the deadline has fired, before the handler is woken, must not move it:
    # from the transport's callback that raised, and asyncio aborted the connection unanswered (found
    # in review, where it happened on every attempt).
    client = await make_client(read_timeout=0.3, min_upload_rate=10_000_000)
    trickler = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRICKLER, str(client.server.port), stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        output, _ = await trickler.communicate()
    assert output.decode().strip() == "HTTP/1.1 408 Request Timeout"
    assert switches
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


def host_timing_out(seconds: float) -> Middleware:
    """A host's middleware that cancels the handler after ``seconds`` and answers 504 itself."""

    @web.middleware
    async def host_timeout(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            async with asyncio.timeout(seconds):
                return await handler(request)
        except TimeoutError:
            return web.json_response({"error": "host timeout"}, status=504)

    return host_timeout


async def test_a_host_that_cancels_the_handler_mid_body_gets_no_request_from_its_middle(
    aiohttp_client: ClientFactory, switches: list[int]
) -> None:
    # The host answers itself (504) and aiohttp keeps the connection: its parser never saw the bytes
    # received past it, so what the client sends next must not be parsed as requests (found in review).
    host = web.Application(middlewares=[host_timing_out(0.5)])
    service = create_app(test_settings(read_timeout=30.0))
    host.add_subapp("/img", service)
    client = await aiohttp_client(host)
    declared, sent = 400_000, 200_000
    reader, writer = await connect(client)
    try:
        head = post(b"\xff" * declared, "image/jpeg", "/img/optimize?width=300")[:-declared]
        writer.write(head + b"\xff" * (sent // 2))
        await writer.drain()
        await until(lambda: bool(switches))
        writer.write(b"\xff" * (sent // 2))  # taken past the parser
        assert await read_answers(reader, 3) == [504]
        # As many bytes as were taken past the parser, then a request: it must not be answered.
        writer.write(b"\xff" * (declared - sent) + b"X" * (sent // 2) + b"GET /img/healthz HTTP/1.1\r\n\r\n")
        assert await read_answers(reader, 2) == []  # nothing of it is parsed
    finally:
        writer.close()
    await until(lambda: service[STATE].gate.in_flight == 0)


async def test_the_standalone_servers_connections_are_switched_too(photo: bytes, switches: list[int]) -> None:
    # optimizer.listener builds them as optimizer.badrequests.ProblemRequestHandler, which changes only
    # how a request the parser refuses is answered.
    runner = web.AppRunner(create_app(test_settings()))
    await runner.setup()
    site = PacedSite(runner, "127.0.0.1", 0, reuse_port=False, full=lambda: False)
    await site.start()
    try:
        await upload_form_and_raw(runner.addresses[0][1], photo)
    finally:
        await runner.cleanup()
    assert len(switches) == 2


async def test_a_host_that_cancels_mid_body_closes_the_connection_after_its_answer(
    aiohttp_client: ClientFactory, switches: list[int]
) -> None:
    # The host's own answer went out keep-alive, aiohttp then lingered 10 s for a body nothing passed on,
    # and the client's next request on the connection was lost (found in review): the answer must say
    # the connection closes, and it must close.
    host = web.Application(middlewares=[host_timing_out(0.5)])
    host.add_subapp("/img", create_app(test_settings(read_timeout=30.0, linger_seconds=0.5)))
    client = await aiohttp_client(host)
    reader, writer = await connect(client)
    try:
        writer.write(post(b"\xff" * 400_000, "image/jpeg", "/img/optimize")[:-300_000])
        await until(lambda: bool(switches))
        status, headers, _ = await read_answer(reader)
        assert (status, headers.get("connection")) == (504, "close")
        async with asyncio.timeout(10):  # closed after the lingering, not kept for a body never read
            assert await reader.read() == b""
    finally:
        writer.close()


def body_reading_host(read: Callable[[web.Request], Awaitable[object]]) -> web.Application:
    """A host whose middleware reads the request's body before the service's handler (an HMAC check)."""

    @web.middleware
    async def reads_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        await read(request)
        return await handler(request)

    host = web.Application(middlewares=[reads_first])
    host.add_subapp("/img", create_app(test_settings()))
    return host


async def test_a_body_the_host_read_whole_is_handed_on(aiohttp_client: ClientFactory, photo: bytes) -> None:
    client = await aiohttp_client(body_reading_host(lambda request: request.read()))
    reader, writer = await connect(client)
    try:
        for request in (form_post(("image", photo)), post(photo, "image/jpeg")):
            writer.write(request.replace(b"POST /optimize", b"POST /img/optimize", 1))
            assert_resized(await read_answer(reader))
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["peek", "stream"])
async def test_a_body_the_host_read_part_of_is_a_500_never_other_memory(
    aiohttp_client: ClientFactory, photo: bytes, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The service took the bytes it lacked for received past the parser, handed out a buffer never
    # filled (whatever that memory held: another upload, found in review) and ate the next requests.
    async def read(request: web.Request) -> object:
        return await (request.content.read(4) if how == "peek" else request.content.read())

    client = await aiohttp_client(body_reading_host(read))
    for request in (form_post(("image", photo)), post(photo, "image/jpeg")):
        reader, writer = await connect(client)
        try:
            writer.write(request.replace(b"POST /optimize", b"POST /img/optimize", 1))
            status, headers, body = await read_answer(reader)
            assert (status, headers["content-type"]) == (500, "application/problem+json")
            assert json.loads(body)["code"] == "internal_error"
        finally:
            writer.close()
    assert "read before the optimizer's handler" in caplog.text  # the host's fault, named in the log
