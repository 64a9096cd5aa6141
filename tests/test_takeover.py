"""Bodies received past aiohttp's parser (``optimizer.takeover``): what the client sees must not change.

Each test talks raw HTTP/1.1 over one socket, so that it can put requests back to back on a connection,
pipeline them, or stop half-way through a body, and then checks that every answer is the right one and
that the connection goes on carrying requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from optimizer import takeover
from optimizer.state import STATE
from tests.conftest import ClientFactory, decode
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
    reader, writer = await connect(client)
    try:
        for request in (form_post(("image", photo)), post(photo, "image/jpeg")):
            writer.write(request)
            assert_resized(await read_answer(reader))
    finally:
        writer.close()
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
