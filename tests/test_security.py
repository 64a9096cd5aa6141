"""API keys, signed URLs and CORS: off by default, and when on, refused with 401/403 problem+json."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from optimizer import Settings
from optimizer.openapi import openapi_document
from optimizer.security import sign
from tests.conftest import image_bytes, multipart

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

KEY = "k3y-0123456789abcdef"
OTHER_KEY = "another-key-0123456789"
SECRET = "s3cret-0123456789abcdef"


async def code_of(response: aiohttp.ClientResponse) -> str:
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = await response.json(content_type=None)
    return str(body["code"])


async def test_everything_is_open_by_default(make_client: MakeClient) -> None:
    client = await make_client()
    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 200
    preflight = await client.options("/optimize", headers={"Origin": "https://a.example"})
    assert preflight.status == 405
    # without signing, 'signature' is just an unknown parameter
    response = await client.post("/optimize?signature=abc", data=multipart(image_bytes()))
    assert response.status == 400


async def test_api_keys(make_client: MakeClient) -> None:
    client = await make_client(api_keys=f"{KEY}, {OTHER_KEY}")
    missing = await client.post("/optimize", data=multipart(image_bytes()))
    assert missing.status == 401
    assert await code_of(missing) == "unauthorized"
    assert "X-API-Key" in missing.headers["WWW-Authenticate"]
    wrong = await client.post("/upload", data=multipart(image_bytes()), headers={"X-API-Key": KEY + "x"})
    assert wrong.status == 401
    for key in (KEY, OTHER_KEY):
        ok = await client.post("/optimize", data=multipart(image_bytes()), headers={"X-API-Key": key})
        assert ok.status == 200
    # probes stay open
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_api_key_checked_before_the_upload(make_client: MakeClient) -> None:
    client = await make_client(api_keys=KEY)
    assert client.server.port is not None
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /optimize HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read(4096)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401")


async def test_signed_urls(make_client: MakeClient) -> None:
    client = await make_client(signing_key=SECRET)
    params = {"width": "20", "format": "png"}
    signature = sign(SECRET, "/optimize", params)

    ok = await client.post(
        "/optimize", params={**params, "signature": signature}, data=multipart(image_bytes())
    )
    assert ok.status == 200
    assert ok.headers["X-Image-Width"] == "20"

    for query in (
        params,  # unsigned
        {**params, "signature": "0" * 64},  # wrong
        {**params, "width": "21", "signature": signature},  # tampered
    ):
        refused = await client.post("/optimize", params=query, data=multipart(image_bytes()))
        assert refused.status == 403
        assert await code_of(refused) == "bad_signature"
    # the path is covered too
    moved = await client.post(
        "/upload", params={**params, "signature": signature}, data=multipart(image_bytes())
    )
    assert moved.status == 403


async def test_signed_urls_expire(make_client: MakeClient) -> None:
    client = await make_client(signing_key=SECRET)
    future = {"width": "20", "expires": str(int(time.time()) + 600)}
    past = {"width": "20", "expires": str(int(time.time()) - 1)}
    ok = await client.post(
        "/optimize",
        params={**future, "signature": sign(SECRET, "/optimize", future)},
        data=multipart(image_bytes()),
    )
    assert ok.status == 200
    expired = await client.post(
        "/optimize",
        params={**past, "signature": sign(SECRET, "/optimize", past)},
        data=multipart(image_bytes()),
    )
    assert expired.status == 403
    assert "expired" in (await expired.json(content_type=None))["detail"]


async def test_cors(make_client: MakeClient) -> None:
    client = await make_client(cors_origins="https://app.example")
    preflight = await client.options(
        "/upload",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]

    response = await client.post(
        "/optimize", data=multipart(image_bytes()), headers={"Origin": "https://app.example"}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Image-Width" in response.headers["Access-Control-Expose-Headers"]
    # errors carry the headers too, or the browser could not read the problem body
    bad = await client.post(
        "/optimize?width=0", data=multipart(image_bytes()), headers={"Origin": "https://app.example"}
    )
    assert bad.headers["Access-Control-Allow-Origin"] == "https://app.example"

    stranger = await client.options("/upload", headers={"Origin": "https://evil.example"})
    assert stranger.status == 403
    assert await code_of(stranger) == "origin_not_allowed"
    plain = await client.post(
        "/optimize", data=multipart(image_bytes()), headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in plain.headers


async def test_cors_answers_vary_by_origin_once_with_or_without_one(make_client: MakeClient) -> None:
    """A shared cache keys on Vary: without it on the answer to a request that had no Origin, the cache
    could hand that copy (no Allow-Origin) to a browser."""
    client = await make_client(cors_origins="https://app.example")
    for response in (
        await client.get("/healthz"),
        await client.get("/healthz", headers={"Origin": "https://APP.example"}),
        await client.options(
            "/upload", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        ),
    ):
        assert response.headers.getall("Vary") == ["Origin"], response.headers
    upper = await client.get("/healthz", headers={"Origin": "https://APP.example"})
    assert upper.headers["Access-Control-Allow-Origin"] == "https://APP.example"  # hosts are case-blind


@pytest.mark.parametrize(
    "overrides", [{"api_keys": "short"}, {"signing_key": "short"}, {"api_keys": f"{KEY},tiny"}]
)
def test_weak_secrets_are_refused(overrides: dict[str, str]) -> None:
    from optimizer import SettingsError

    with pytest.raises(SettingsError):
        Settings(**overrides)  # type: ignore[arg-type]


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings(api_keys=KEY, signing_key=SECRET)
    assert KEY not in repr(settings)
    assert SECRET not in repr(settings)


def test_document_describes_access_control() -> None:
    document = openapi_document(Settings(api_keys=KEY, signing_key=SECRET, cors_origins="*"))
    validate(document)
    optimize = document["paths"]["/optimize"]
    assert "options" in optimize
    assert optimize["post"]["security"] == [{"apiKey": []}]
    assert "signature" in {p["name"] for p in optimize["post"]["parameters"]}


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100-continue"])
async def test_undecodable_api_key_is_401_not_500(make_client: MakeClient, expect: bool) -> None:
    import asyncio

    client = await make_client(api_keys=KEY)
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    extra = b"Expect: 100-continue\r\n" if expect else b""
    writer.write(
        b"POST /optimize HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nX-API-Key: \xff\xfeabc\r\n"
        + extra
        + b"Content-Length: 4\r\n\r\n"
        + (b"" if expect else b"\xff\xd8\xff\x00")
    )
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read(4096)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"unauthorized" in answer
