"""Metrics per app instance, request ids, and the per-request log line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.payload import Payload
from aiohttp.test_utils import TestClient, TestServer

from optimizer import create_app
from optimizer.observe import client_address
from optimizer.state import STATE
from tests.conftest import image_bytes, multipart, test_settings

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


async def test_metrics_count_requests_stages_and_refusals(make_client: MakeClient) -> None:
    client = await make_client(threads=2, queue=1)
    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 200
    assert (await client.post("/optimize", data=multipart(b"%PDF-1.4 not an image"))).status == 415

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert sample(text, "optimizer_requests_total", route="/optimize", status="200") == 1
    assert sample(text, "optimizer_requests_total", route="/optimize", status="415") == 1
    assert sample(text, "optimizer_refusals_total", reason="unsupported_format") == 1
    for stage in ("read", "queue", "decode", "resize", "encode"):
        assert sample(text, "optimizer_stage_duration_seconds_count", stage=stage) == 1
    assert sample(text, "optimizer_request_duration_seconds_count", route="/optimize") == 2
    assert sample(text, "optimizer_in_flight") == 0
    assert sample(text, "optimizer_capacity") == 3
    assert sample(text, "optimizer_lingering_connections") == 0
    received = sample(text, "optimizer_received_bytes_total")
    sent = sample(text, "optimizer_sent_bytes_total")
    assert received is not None and received > 0
    assert sent is not None and sent > 0


async def test_preflights_are_counted_apart_from_the_uploads(make_client: MakeClient) -> None:
    client = await make_client(cors_origins="https://app.example")
    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 200
    for _ in range(3):
        asked = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        assert (await client.options("/optimize", headers=asked)).status == 204
    text = await (await client.get("/metrics")).text()
    assert sample(text, "optimizer_request_duration_seconds_count", route="/optimize") == 1
    assert sample(text, "optimizer_requests_total", route="/optimize preflight", status="204") == 3


async def test_an_expectation_other_than_100_continue_is_ignored_not_a_plain_417(
    make_client: MakeClient,
) -> None:
    """aiohttp's default hook answers it 417 in plain text, before any middleware: no problem body, no
    request id, no log line, no metric."""
    client = await make_client()
    for method, path in (("GET", "/healthz"), ("POST", "/optimize")):
        data = multipart(image_bytes()) if method == "POST" else None
        response = await client.request(method, path, headers={"Expect": "something-else"}, data=data)
        assert response.status == 200, path
        assert "X-Request-ID" in response.headers


async def test_two_embedded_apps_keep_separate_metrics(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    parent = web.Application()
    a_app, b_app = create_app(test_settings()), create_app(test_settings())
    parent.add_subapp("/a", a_app)
    parent.add_subapp("/b", b_app)
    client = await aiohttp_client(TestServer(parent))
    assert (await client.post("/a/optimize", data=multipart(image_bytes()))).status == 200
    pools = [app[STATE].pool for app in (a_app, b_app)]
    names = [{thread.name.rpartition("_")[0] for thread in pool._threads} for pool in pools if pool]
    assert len(names[0]) == len(names[1]) == 1 and names[0] != names[1]  # py-spy tells the two pools apart

    a_text = await (await client.get("/a/metrics")).text()
    b_text = await (await client.get("/b/metrics")).text()
    assert sample(a_text, "optimizer_requests_total", route="/a/optimize", status="200") == 1
    assert sample(b_text, "optimizer_requests_total", route="/a/optimize", status="200") is None
    assert sample(b_text, "optimizer_stage_duration_seconds_count", stage="decode") is None


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("abc-123", True), ("trace:1/2@x", True), ("bad\tid", False), ("x" * 200, False), ("", False)],
)
async def test_request_id_is_echoed_or_assigned(make_client: MakeClient, sent: str, echoed: bool) -> None:
    client = await make_client()
    headers = {"X-Request-ID": sent} if sent else {}
    for response in (
        await client.post("/optimize", data=multipart(image_bytes()), headers=headers),
        await client.post("/optimize?width=0", data=multipart(image_bytes()), headers=headers),
        await client.get("/nowhere", headers=headers),
    ):
        rid = response.headers["X-Request-ID"]
        assert (rid == sent) is echoed
        assert rid


async def test_generated_request_ids_differ(make_client: MakeClient) -> None:
    client = await make_client()
    ids = {(await client.get("/healthz")).headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3


async def test_one_structured_log_line_per_request(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    with caplog.at_level(logging.INFO, logger="optimizer.access"):
        response = await client.post(
            "/optimize",
            data=multipart(image_bytes()),
            headers={"X-Request-ID": "req-42", "User-Agent": "agent/1", "X-Forwarded-For": "x" * 1000},
        )
        await client.post("/optimize", data=multipart(b""), headers={"X-Request-ID": "req-43"})
    assert response.status == 200
    lines = [record for record in caplog.records if record.name == "optimizer.access"]
    assert len(lines) == 2
    fields = [record.__dict__["fields"] for record in lines]
    assert fields[0]["request_id"] == "req-42"
    assert fields[0]["status"] == 200
    assert fields[0]["method"] == "POST"
    assert fields[0]["path"] == "/optimize"
    assert fields[0]["bytes_in"] > 0
    assert fields[0]["bytes_out"] == int(response.headers["Content-Length"])
    assert fields[1]["code"] == "empty_body"
    assert fields[0]["client"] == "127.0.0.1" and fields[0]["user_agent"] == "agent/1"
    assert fields[0]["forwarded_for"] == "x" * 256  # cut short: no client makes a line long
    json.dumps(fields)  # serialisable as the JSON log formatter needs


@pytest.mark.parametrize(
    ("remote", "logged"),
    [
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client of a dual-stack "::" listener
        ("::FFFF:192.0.2.7", "192.0.2.7"),
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:not-an-address", "::ffff:not-an-address"),
        (None, None),
    ],
)
def test_access_lines_name_ipv4_clients_alike_on_any_listener(remote: str | None, logged: str | None) -> None:
    assert client_address(remote) == logged


async def upload_expecting_continue(client: Client, path: str) -> tuple[bytes, bytes]:
    """POST 10 bytes to ``path`` with ``Expect: 100-continue``, the body only once invited: the first
    answer's head, and the final one's (the same, when the server refused before the body)."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            first = final = await reader.readuntil(b"\r\n\r\n")
            if first.startswith(b"HTTP/1.1 100"):
                writer.write(b"0123456789")
                final = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    return first, final


async def test_embedded_apps_answer_their_own_unknown_paths_and_methods(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Under its prefix each app answers what none of its routes takes, and counts it; elsewhere the
    host's own routes and answers are untouched."""

    async def hosts_own(_request: web.Request) -> web.Response:
        return web.Response(text="host")

    parent = web.Application()
    parent.router.add_get("/hello", hosts_own)
    parent.add_subapp("/a", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))
    put = await client.put("/a/optimize", data=b"x")
    assert put.status == 405
    assert set(put.headers["Allow"].split(",")) == {"POST"}
    assert (await put.json(content_type="application/problem+json"))["code"] == "method_not_allowed"
    missing = await client.get("/a/nope")
    assert missing.status == 404
    assert missing.content_type == "application/problem+json"
    assert (await (await client.get("/hello")).text()) == "host"
    host_missing = await client.get("/elsewhere")
    assert host_missing.status == 404
    assert host_missing.content_type != "application/problem+json"  # the host's own 404
    # Under a host an upload that expects 100-continue is invited (the host's middlewares may still
    # answer it), then refused as problem+json; never a plain-text 417.
    first, head = await upload_expecting_continue(client, "/a/nope")
    assert first.startswith(b"HTTP/1.1 100")
    assert head.startswith(b"HTTP/1.1 404")
    assert b"application/problem+json" in head
    text = await (await client.get("/a/metrics")).text()
    assert sample(text, "optimizer_requests_total", route="unmatched", status="405") == 1
    assert sample(text, "optimizer_requests_total", route="unmatched", status="404") == 2


async def test_a_hosts_path_normalising_still_redirects_under_the_prefix(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Found in review: a catch-all route of the app's own (an earlier fix for Expect on unmatched paths)
    made aiohttp's ``normalize_path_middleware`` see a match, and stop redirecting."""
    parent = web.Application(
        middlewares=[web.normalize_path_middleware(merge_slashes=True, remove_slash=True, append_slash=False)]
    )
    parent.add_subapp("/img", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))
    for path in ("/img//healthz", "/img/healthz/"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 308, path
        assert response.headers["Location"] == "/img/healthz"


async def test_a_hosts_middleware_may_read_or_replace_an_image_answer(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """The body is a payload sent in pieces (``optimizer.sending``): readable with ``as_bytes()``, and
    replaced as any body, its length following (found in review: a fixed Content-Length went stale)."""
    seen: list[bytes] = []

    @web.middleware
    async def stamp(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if isinstance(response, web.Response) and response.content_type.startswith("image/"):
            assert isinstance(response.body, Payload)
            seen.append(await response.body.as_bytes())
            if request.headers.get("X-Stamp"):
                response.body = b"STAMPED"
        return response

    parent = web.Application(middlewares=[stamp])
    parent.add_subapp("/img", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))
    plain = await client.post("/img/optimize", data=multipart(image_bytes()))
    assert plain.status == 200
    assert await plain.read() == seen[0]
    assert int(plain.headers["Content-Length"]) == len(seen[0])
    stamped = await client.post("/img/optimize", data=multipart(image_bytes()), headers={"X-Stamp": "1"})
    assert stamped.status == 200
    assert stamped.headers["Content-Length"] == "7"
    assert await stamped.read() == b"STAMPED"


async def test_under_a_host_an_upload_expecting_100_continue_is_still_redirected(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """The host's middlewares may answer what no route of the service's matches: the service's hook
    must not refuse it first (found in review: 404 instead of the 308)."""
    parent = web.Application(
        middlewares=[web.normalize_path_middleware(merge_slashes=True, remove_slash=True, append_slash=False)]
    )
    parent.add_subapp("/img", create_app(test_settings()))
    client = await aiohttp_client(TestServer(parent))
    interim, final = await upload_expecting_continue(client, "/img/optimize/")
    assert interim.startswith(b"HTTP/1.1 100")
    assert final.startswith(b"HTTP/1.1 308")
    assert b"Location: /img/optimize" in final


async def test_a_sub_app_of_the_services_app_keeps_aiohttps_answers(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    """Found in review: the service's hook on a nested app's unmatched route found no service state
    there, and answered 500."""
    service = create_app(test_settings())
    service.add_subapp("/extra", web.Application())
    client = await aiohttp_client(TestServer(service))
    _first, head = await upload_expecting_continue(client, "/extra/missing")
    assert head.startswith(b"HTTP/1.1 404"), head
